"""``diffaug env``: versions and devices, for bug reports."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

HELP = "print versions and devices, for bug reports"

_PACKAGES = ("diffaug", "torch", "numpy", "scikit-image", "opencv-python-headless", "albumentations", "monai",
             "safetensors", "huggingface-hub", "staintools", "ray")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print(f"python: {platform.python_version()} ({platform.platform()})")
    for name in _PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name}: {version}")
    import torch

    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i}: {torch.cuda.get_device_name(i)}")
    return 0
