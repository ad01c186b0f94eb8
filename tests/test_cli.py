"""The ``diffaug`` command line: help lists the subcommands; errors exit 2 with a message."""

from __future__ import annotations

import subprocess
import sys

from diffaug.cli import COMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "diffaug", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"    {name}" in out, f"'diffaug --help' does not list {name}:\n{out}"


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    assert "commands" in capsys.readouterr().out


def test_every_subcommand_module_exists():
    import importlib

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_import_is_cheap():
    code = "import sys, diffaug, diffaug.cli; print(any(m in sys.modules for m in ('torch', 'cv2', 'monai', 'albumentations')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
