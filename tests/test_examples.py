"""The runnable examples run (``--smoke``) and produce what they promise."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hovernet_diffmix.py"


@pytest.mark.parametrize("backend", ["albumentations", "monai"])
def test_hovernet_diffmix_example_smoke(backend, tmp_path, capsys, monkeypatch):
    from diffaug.segmenter import Segmenter

    module = runpy.run_path(str(EXAMPLE), run_name="example")
    monkeypatch.setattr(sys, "argv", ["hovernet_diffmix.py"])
    assert module["main"](["--smoke", "--backend", backend, "--out", str(tmp_path / "seg")]) == 0
    out = capsys.readouterr().out
    assert "step 2: loss" in out
    # --smoke re-renders every sample (p=1) with the built-in checkpoint in 2 loader workers: all 4 are synthetic
    assert re.search(r"step 2: .*synthetic samples so far 4/4", out), out
    model = Segmenter.from_pretrained(tmp_path / "seg")
    assert model.config.num_classes == 5 and model.config.scheme == "consep-hovernet"
