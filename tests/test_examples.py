"""The runnable examples run (``--smoke``) and produce what they promise."""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hovernet_diffmix.py"

_MISSING = [m for m in ("diffaug.transforms.diffmix", "diffaug.transforms.monai", "diffaug.models", "diffaug.pipelines")
            if importlib.util.find_spec(m) is None]


@pytest.mark.xfail(bool(_MISSING), strict=False,
                   reason=f"needs DiffMixTransform/DiffMixd, SemanticUNet and the pipeline; missing: {_MISSING}")
@pytest.mark.parametrize("backend", ["albumentations", "monai"])
def test_hovernet_diffmix_example_smoke(backend, tmp_path, capsys, monkeypatch):
    from diffaug.segmenter import Segmenter

    module = runpy.run_path(str(EXAMPLE), run_name="example")
    monkeypatch.setattr(sys, "argv", ["hovernet_diffmix.py"])
    assert module["main"](["--smoke", "--backend", backend, "--out", str(tmp_path / "seg")]) == 0
    out = capsys.readouterr().out
    assert "step 2: loss" in out and "synthetic samples so far" in out
    model = Segmenter.from_pretrained(tmp_path / "seg")
    assert model.config.num_classes == 5 and model.config.scheme == "consep-hovernet"
