"""Packaging glue that pyproject.toml cannot express: the top-level ``checkpoints/`` folder ships inside the
package as ``diffaug.checkpoints``, so the built-in weights install with a plain ``pip install .``."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["diffaug", "diffaug.*"]), "diffaug.checkpoints"],
    package_dir={"diffaug.checkpoints": "checkpoints"},
    package_data={"diffaug": ["py.typed", "assets/**/*", "configs/*.yaml"], "diffaug.checkpoints": ["**/*"]},
)
