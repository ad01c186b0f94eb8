"""Subcommands of the ``diffaug`` CLI, one module each (see :mod:`diffaug.cli`)."""
