"""Model cards, configs and small weights of diffaug's checkpoints.

This top-level folder is installed as the package ``diffaug.checkpoints`` (see setup.py), so a non-editable install
finds the built-in checkpoint too: ``importlib.resources.files("diffaug.checkpoints") / "builtin"``.
"""
