"""Shared test fixtures.

Real data comes from ``$DIFFAUG_DATA`` (default ``../shared/data`` beside the repository) and golden outputs from
``$DIFFAUG_FIXTURES`` (default ``../shared/fixtures``). When they are missing, tests that need them are skipped
locally and fail under CI (``CI`` set), so a CI run can never pass vacuously.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_path(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, default)).resolve()


DATA_DIR = _shared_path("DIFFAUG_DATA", REPO.parent / "shared" / "data")
FIXTURES_DIR = _shared_path("DIFFAUG_FIXTURES", REPO.parent / "shared" / "fixtures")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        msg = f"{what} not found at {path}; set the environment variable to its location"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA_DIR, "shared data ($DIFFAUG_DATA)")


@pytest.fixture(scope="session")
def consep_dir(data_dir: Path) -> Path:
    return _require(data_dir / "consep_train", "CoNSeP tiles")


@pytest.fixture(scope="session")
def monuseg_dir(data_dir: Path) -> Path:
    return _require(data_dir / "monuseg_test", "MoNuSeg tiles")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _require(FIXTURES_DIR, "golden fixtures ($DIFFAUG_FIXTURES)")


@pytest.fixture(scope="session")
def sdm_fixture_dir(fixtures_dir: Path) -> Path:
    return _require(fixtures_dir / "sdm_reference", "SDM reference fixtures")


@pytest.fixture(scope="session")
def hovernet_fixture_dir(fixtures_dir: Path) -> Path:
    return _require(fixtures_dir / "hovernet_metrics", "HoVer-Net metric fixtures")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
