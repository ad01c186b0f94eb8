"""The online pool: bounded, reuse-limited, never blocking, shared by DataLoader workers (fork and spawn)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

from diffaug.data.schemes import SCHEMES
from diffaug.data.tiles import TileFolder, write_classes_json, write_tile
from diffaug.errors import DataFormatError, DiffaugError, InvalidInputError
from diffaug.labels.validate import validate_label_map
from diffaug.transforms import DiffMixSynthesizer, DiffMixTransform, PoolFiller, SynthesisPool
from test_transforms import fixture_model  # noqa: F401  (the converted SDM fixture, a pytest fixture)

SIZE = 64


@pytest.fixture(scope="module")
def crops(consep_dir: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Eight real 64² crops of CoNSeP tiles (image, inst_map, type_map), ids renumbered."""
    from diffaug.labels.instances import relabel_sequential

    folder = TileFolder(consep_dir)
    out = []
    for name in ["train_19_000", "train_19_004", "train_19_007", "train_17_010"]:
        tile = folder.read(name)
        for y0 in (0, 128):
            win = (slice(y0, y0 + SIZE), slice(64, 64 + SIZE))
            out.append((np.ascontiguousarray(tile.image[win]), relabel_sequential(tile.inst_map[win]),
                        np.ascontiguousarray(tile.type_map[win])))
    return out


@pytest.fixture
def pool(tmp_path: Path):
    with SynthesisPool.create(capacity=4, tile_shape=(SIZE, SIZE), reuse=3, directory=tmp_path) as p:
        yield p


def test_pairs_are_reused_k_times_then_freed(pool: SynthesisPool, crops) -> None:
    rng = np.random.default_rng(0)
    for image, inst, types in crops[:2]:
        assert pool.put(image, inst, types)
    taken = [pool.try_take(rng) for _ in range(6)]
    assert all(t is not None for t in taken)
    uses = {seq: sorted(t.use for t in taken if t.seq == seq) for seq in (0, 1)}
    assert uses == {0: [1, 2, 3], 1: [1, 2, 3]}
    for t in taken:  # the content is the pair that was put, as copies
        image, inst, types = crops[t.seq]
        assert np.array_equal(t.image, image) and np.array_equal(t.inst_map, inst)
        assert np.array_equal(t.type_map, types)
    taken[0].image[...] = 0
    assert pool.try_take(rng) is None  # both pairs used up: a miss, not a wait
    stats = pool.stats()
    assert (stats.hits, stats.misses, stats.produced, stats.retired, stats.filled) == (6, 1, 2, 2, 0)
    assert stats.mean_reuse == 3.0 and stats.hit_rate == pytest.approx(6 / 7)


def test_bounded_and_never_blocking(pool: SynthesisPool, crops) -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    assert pool.try_take(rng) is None
    assert time.perf_counter() - start < 0.5
    for image, inst, types in crops[:4]:
        assert pool.put(image, inst, types)
    assert len(pool) == 4
    start = time.perf_counter()
    assert not pool.put(*crops[4], timeout=0.05)  # full: the producer gives up after its timeout
    assert time.perf_counter() - start < 1.0
    while pool.stats().retired == 0:  # use pairs until one has had its 3 uses
        pool.try_take(rng)
    assert pool.put(*crops[4], timeout=0.0)  # its slot is free again
    assert not pool.put(*crops[5], timeout=0.0)


def test_prefill_from_a_generated_folder(tmp_path: Path, pool: SynthesisPool, crops) -> None:
    folder = tmp_path / "generated"
    folder.mkdir()
    write_classes_json(folder, SCHEMES["consep-hovernet"])
    for k, (image, inst, types) in enumerate(crops[:3]):
        write_tile(folder, f"syn_{k}", image=image, inst_map=inst, type_map=types)
    assert pool.prefill_from_folder(folder) == 3
    seen = {pool.try_take(np.random.default_rng(k)).image.tobytes() for k in range(9)}
    assert seen == {image.tobytes() for image, _, _ in crops[:3]}
    write_tile(folder, "syn_big", image=np.zeros((80, 80, 3), np.uint8), inst_map=np.zeros((80, 80), np.int32),
               type_map=np.zeros((80, 80), np.int32))
    with pytest.raises(DataFormatError, match=r"syn_big.npz: tile is \(80, 80\) but the pool holds \(64, 64\)"):
        pool.prefill_from_folder(folder)


def test_pickled_pool_reattaches_and_creator_deletes_the_file(tmp_path: Path, crops) -> None:
    pool = SynthesisPool.create(capacity=2, tile_shape=(SIZE, SIZE), directory=tmp_path)
    pool.put(*crops[0])
    other = pickle.loads(pickle.dumps(pool))
    assert other.name == pool.name and len(other) == 1
    other.close()
    assert Path(pool.name).exists()
    pool.unlink()
    assert not Path(pool.name).exists()
    with pytest.raises(InvalidInputError, match=r"no synthesis pool at .*create one with SynthesisPool.create"):
        SynthesisPool.attach(pool.name)


class _Samples(torch.utils.data.Dataset):
    def __init__(self, sample, transform: A.Compose, n: int) -> None:
        self.sample, self.transform, self.n = sample, transform, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        image, inst, types = self.sample
        out = self.transform(image=image, masks=[inst, types])
        return {"image": out["image"], "inst": out["masks"][0], "is_synthetic": out["is_synthetic"]}


def _loader_run(pool: SynthesisPool, crops, context: str | None, n: int = 8) -> list[dict]:
    transform = A.Compose([DiffMixTransform(model="unused-in-pool-mode", policy="enlarge", pool=pool, p=1.0)],
                          seed=0)
    dataset = _Samples(crops[7], transform, n)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context=context)
    return list(loader)


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_share_one_pool(pool: SynthesisPool, crops, context: str) -> None:
    for image, inst, types in crops[:2]:
        pool.put(image, inst, types)
    batches = _loader_run(pool, crops, context)
    images = [img.numpy() for b in batches for img in b["image"]]
    synthetic = [bool(s) for b in batches for s in b["is_synthetic"]]
    # 2 pairs x 3 uses = 6 synthetic samples across both workers; then the empty pool falls back to the real sample.
    assert sum(synthetic) == 6
    pool_images = [crops[0][0].tobytes(), crops[1][0].tobytes()]
    for image, flag in zip(images, synthetic):
        assert (image.tobytes() in pool_images) if flag else np.array_equal(image, crops[7][0])
    assert all(sum(img.tobytes() == ref for img in images) == 3 for ref in pool_images)
    stats = pool.stats()
    assert (stats.hits, stats.misses, stats.retired) == (6, 2, 2)


def test_pool_ratio_mixes_in_pool_pairs_at_the_set_rate(tmp_path: Path, crops) -> None:
    with SynthesisPool.create(capacity=1, tile_shape=(SIZE, SIZE), reuse=10_000, directory=tmp_path) as pool:
        pool.put(*crops[0])
        aug = A.Compose([DiffMixTransform(model="unused", policy="enlarge", pool=pool.name, pool_ratio=0.25, p=1.0)],
                        seed=0)
        flags = [aug(image=crops[1][0], masks=list(crops[1][1:]))["is_synthetic"] for _ in range(400)]
        assert 70 <= sum(flags) <= 130  # binomial(400, 0.25): mean 100, sd 8.7
        assert pool.stats().hits == sum(flags) and pool.stats().misses == 0


def test_pool_mismatch_errors(tmp_path: Path, crops) -> None:
    image, inst, types = crops[0]
    with SynthesisPool.create(capacity=1, tile_shape=(32, 32), directory=tmp_path) as small, \
            SynthesisPool.create(capacity=1, tile_shape=(SIZE, SIZE), with_types=False, directory=tmp_path) as plain:
        with pytest.raises(InvalidInputError, match=r"pool holds \(32, 32\) pairs but the sample is \(64, 64\)"):
            DiffMixTransform(model="m", policy="enlarge", pool=small, p=1.0)(image=image, masks=[inst, types])
        with pytest.raises(InvalidInputError, match=r"pool has no type maps but the sample has one"):
            DiffMixTransform(model="m", policy="enlarge", pool=plain, p=1.0)(image=image, masks=[inst, types])
        with pytest.raises(InvalidInputError, match=r"pool.put: pair is \(64, 64\) but this pool holds \(32, 32\)"):
            small.put(image, inst, types)
        with pytest.raises(InvalidInputError, match=r"with_types=False; pass no type_map"):
            plain.put(image, inst, types)
        with pytest.raises(InvalidInputError, match=r"image must be uint8 \(H, W, 3\)"):
            plain.put(image.astype(np.float32), inst)
    for kwargs, message in [({"capacity": 0}, "capacity must be an integer >= 1"),
                            ({"reuse": 0}, "reuse must be an integer >= 1"),
                            ({"tile_shape": (64,)}, "tile_shape must be \\(H, W\\)")]:
        args = {"capacity": 2, "tile_shape": (SIZE, SIZE), "reuse": 2, **kwargs}
        with pytest.raises(InvalidInputError, match=message):
            SynthesisPool.create(args.pop("capacity"), args.pop("tile_shape"), directory=tmp_path, **args)


class _CountingMaker:
    """A cheap, picklable pair maker: real crops, the image brightened by the item index."""

    def __init__(self, crops, fail_at: int | None = None) -> None:
        self.crops, self.fail_at = crops, fail_at

    def __call__(self, index: int):
        if index == self.fail_at:
            raise ValueError(f"bad item {index}")
        image, inst, types = self.crops[index % len(self.crops)]
        return np.clip(image.astype(np.int32) + index, 0, 255).astype(np.uint8), inst, types


@pytest.mark.parametrize("process", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_filler_keeps_the_pool_full_without_overfilling(pool: SynthesisPool, crops, process: bool) -> None:
    with PoolFiller(pool, _CountingMaker(crops[:4]), process=process):
        deadline = time.monotonic() + 60
        while len(pool) < pool.capacity and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pool) == pool.capacity
        time.sleep(0.2)
        assert pool.stats().produced == pool.capacity  # full: the filler waits for a free slot
        rng = np.random.default_rng(0)
        while pool.stats().retired == 0:  # use pairs until one slot is free
            assert pool.try_take(rng) is not None
        while pool.stats().produced < pool.capacity + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert pool.stats().produced >= pool.capacity + 1  # freed slots were refilled


def test_filler_errors_surface(pool: SynthesisPool, crops) -> None:
    filler = PoolFiller(pool, _CountingMaker(crops[:4], fail_at=2)).start()
    deadline = time.monotonic() + 30
    while filler.running and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(DiffaugError, match=r"the pool generator failed: ValueError: bad item 2"):
        filler.stop()
    assert pool.stats().produced == 2


@pytest.mark.slow
def test_synthesizer_fills_a_pool_with_valid_pairs(tmp_path: Path, consep_dir: Path, fixture_model: str) -> None:
    synth = DiffMixSynthesizer(consep_dir, (96, 96), seed=0, model=fixture_model, policy="both", rare_classes=[1],
                               num_inference_steps=10, strength=0.1, guidance_scale=1.0, device="cpu")
    synth = pickle.loads(pickle.dumps(synth))  # what a filler process receives
    first = synth(3)
    assert all(np.array_equal(a, b) for a, b in zip(first, synth(3)))  # deterministic per index
    with SynthesisPool.create(capacity=2, tile_shape=(96, 96), directory=tmp_path) as pool:
        with PoolFiller(pool, synth, indices=range(2)) as filler:
            deadline = time.monotonic() + 120
            while len(pool) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            filler.check()
        pair = pool.try_take(np.random.default_rng(0))
        validate_label_map(pair.inst_map, pair.type_map, num_classes=5)
        assert pair.image.shape == (96, 96, 3)
