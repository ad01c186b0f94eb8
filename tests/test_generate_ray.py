"""The Ray engine writes what the local engine writes: the same label maps and records, images within rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffaug.generate import GenerateOptions, generate
from test_generate import assert_images_close, fixture_model, options, small_data, tree_bytes  # noqa: F401

ray = pytest.importorskip("ray", reason="Ray is not installed: the Ray engine test needs pip install 'diffaug[ray]'")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture
def local_ray():
    import diffaug

    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'diffaug[ray]'")
    source = str(Path(diffaug.__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": source}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_the_local_engine(local_ray, small_data: Path, fixture_model: Path, tmp_path: Path):
    local = options(tmp_path / "local", small_data, fixture_model, policy="both", format="both", limit=5,
                    batch_size=2)
    generate(local)
    # Default actor count: one per CPU slot of the cluster (2 here), at most one per pending batch (3).
    on_ray = GenerateOptions(**{**local.__dict__, "out": tmp_path / "ray", "engine": "ray", "device": None})
    result = generate(on_ray)
    assert result.generated == 5 and result.workers == 2
    a, b = tree_bytes(local.out), tree_bytes(on_ray.out)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith((".npz", ".json", ".jsonl")) or key == "class_counts.png":
            assert a[key] == b[key], key
    assert_images_close(local.out, on_ray.out)
    records = [json.loads(line) for line in (on_ray.out / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(5))


def test_address_with_ray_already_running_is_an_error(local_ray, small_data: Path, fixture_model: Path,
                                                       tmp_path: Path):
    from diffaug.errors import ConfigError

    opts = options(tmp_path / "o", small_data, fixture_model, limit=1, engine="ray", ray_address="10.0.0.1:6379")
    with pytest.raises(ConfigError, match="already initialised"):
        generate(opts)
