"""A plain (non-editable) install ships what the README's first command needs: the built-in checkpoint with its card,
the sample tiles and the shipped configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_the_builtin_checkpoint_sample_tiles_and_configs(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("diffaug-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.json", "model.safetensors", "MODEL_CARD.md"):
        assert f"diffaug/checkpoints/builtin/{name}" in names, sorted(n for n in names if "checkpoints" in n)
    tiles = sorted(n for n in names if n.startswith("diffaug/assets/sample_tiles/") and n.endswith(".npz"))
    assert len(tiles) == 4 and "diffaug/assets/sample_tiles/classes.json" in names
    assert {"diffaug/configs/builtin.yaml", "diffaug/configs/tiny.yaml"} <= names
    weights = zipfile.ZipFile(wheel).getinfo("diffaug/checkpoints/builtin/model.safetensors")
    assert weights.file_size <= 25 * 2**20  # the size budget for a checkpoint that ships in the package
