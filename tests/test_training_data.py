"""Training data: resumable order and sharding, identical augmentation of image and maps, bad data folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaug.data import TileFolder
from diffaug.errors import ConfigError, DataFormatError
from diffaug.training.data import (Augmentation, ShardedBatchSampler, crop_and_augment, data_order, dihedral,
                                   fixed_crops, image_to_tensor, open_training_data, tensor_to_image,
                                   tile_of_sample)


def _open(root: Path, **kw):
    args = dict(classes="default", holdout=[], size=32, seed=0, stain_target=None, stain_method="vahadane",
                cache=False)
    args.update(kw)
    return open_training_data(root, **args)


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    a = data_order(7, 0, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, data_order(7, 0, 50))
    assert not np.array_equal(a, data_order(7, 1, 50))
    assert not np.array_equal(a, data_order(8, 0, 50))
    # the stream runs epoch after epoch: each block of n samples visits every tile once
    stream = [tile_of_sample(7, k, 50) for k in range(150)]
    for epoch in range(3):
        assert sorted(stream[epoch * 50:(epoch + 1) * 50]) == list(range(50))
        assert stream[epoch * 50:(epoch + 1) * 50] == data_order(7, epoch, 50).tolist()


def test_sharded_batches_are_disjoint_complete_and_resumable() -> None:
    world, batch, steps = 3, 4, 5
    shards = [list(ShardedBatchSampler(start=0, num_steps=steps, batch_size=batch, rank=r, world_size=world))
              for r in range(world)]
    seen = [k for shard in shards for b in shard for k in b]
    assert sorted(seen) == list(range(world * batch * steps))  # disjoint and complete
    for step in range(steps):  # step i covers the i-th block of W*B samples
        block = sorted(k for shard in shards for k in shard[step])
        assert block == list(range(step * world * batch, (step + 1) * world * batch))
    # resuming after 2 steps: a sampler started at the samples consumed yields exactly the remaining batches
    for r in range(world):
        resumed = list(ShardedBatchSampler(start=2 * world * batch, num_steps=steps - 2, batch_size=batch, rank=r,
                                           world_size=world))
        assert resumed == shards[r][2:]


def test_batches_do_not_depend_on_dataloader_workers(consep_dir: Path) -> None:
    ds, _ = _open(consep_dir)

    def batches(workers: int) -> list[dict[str, torch.Tensor]]:
        sampler = ShardedBatchSampler(start=5, num_steps=3, batch_size=3, rank=1, world_size=2)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return list(loader)

    inline, workers = batches(0), batches(2)
    assert len(inline) == len(workers) == 3
    for a, b in zip(inline, workers):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["y"], b["y"])
    assert torch.equal(inline[0]["image"][0], ds[5 + 3]["image"])  # rank 1 of 2 starts one batch in


def test_dihedral_covers_the_eight_symmetries() -> None:
    a = np.arange(12).reshape(3, 4)
    results = {dihedral(a, k, f).tobytes() + bytes(dihedral(a, k, f).shape) for k in range(4) for f in (False, True)}
    assert len(results) == 8
    assert np.array_equal(dihedral(a, 1, False), np.rot90(a))
    assert np.array_equal(dihedral(a, 0, True), a[:, ::-1])
    rgb = np.stack([a, a + 100, a + 200], axis=-1)  # channels ride along
    assert np.array_equal(dihedral(rgb, 3, True)[..., 1], dihedral(a, 3, True) + 100)


def test_crop_and_augment_moves_image_and_maps_together() -> None:
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 9, size=(20, 24)).astype(np.int32)
    image = np.stack([inst * 10, inst * 20, inst * 3], axis=-1).astype(np.uint8)  # image encodes the id
    types = (inst % 3).astype(np.int32)
    for rot in range(4):
        for flip in (False, True):
            aug = Augmentation(top=3, left=5, size=12, rot90=rot, flip=flip)
            img, ins, typ = crop_and_augment([image, inst, types], aug)
            assert img.shape == (12, 12, 3) and ins.shape == typ.shape == (12, 12)
            assert np.array_equal(img[..., 0], ins * 10) and np.array_equal(typ, ins % 3)
            assert np.array_equal(ins, dihedral(inst[3:15, 5:17], rot, flip))
    assert crop_and_augment([None], Augmentation(0, 0, 4, 0, False)) == [None]


def test_image_tensor_round_trip() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = image_to_tensor(image)
    assert x.shape == (3, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(tensor_to_image(x), image)


def test_training_samples_on_consep(consep_dir: Path) -> None:
    ds, held = _open(consep_dir, holdout=["train_1_*"])
    assert held == [f"train_1_{i:03d}" for i in range(16)]
    assert len(ds) == 432 - 16 and not set(held) & set(ds.names)
    assert ds.scheme.name == "consep-hovernet" and ds.num_classes == 5
    item = ds[123]
    assert item["image"].shape == (3, 32, 32) and item["y"].shape == (6, 32, 32)
    assert item["image"].dtype == item["y"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    y = item["y"].numpy()
    assert np.array_equal(y[:5].sum(0), np.ones((32, 32)))  # one-hot over the 5 classes
    # the same index gives the same sample, from a fresh dataset too (no hidden state, worker-independent)
    again, _ = _open(consep_dir, holdout=["train_1_*"])
    for k in (0, 123, 5000):
        a, b = ds[k], again[k]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["y"], b["y"])
    assert not torch.equal(ds[0]["image"], ds[1]["image"])


def test_augmentation_matches_the_tile(consep_dir: Path) -> None:
    """Rebuild sample k by hand from its tile: image and condition come from the same window and symmetry."""
    from diffaug.labels.condition import sdm_condition
    from diffaug.training.data import _AUG_STREAM, draw_augmentation

    ds, _ = _open(consep_dir)
    seen = set()
    for k in range(40):
        tile = ds.read(ds.names[ds.tile_index(k)])
        aug = draw_augmentation(np.random.default_rng((0, _AUG_STREAM, k)), tile.shape, 32)
        seen.add((aug.rot90, aug.flip))
        image, inst, types = crop_and_augment([tile.image, tile.inst_map, tile.type_map], aug)
        item = ds[k]
        assert np.array_equal(tensor_to_image(item["image"]), image)
        assert np.array_equal(item["y"].numpy(), sdm_condition(types, inst, 5))
    assert len(seen) >= 6  # the symmetries are actually drawn


def test_instance_only_folder_trains_with_a_nucleus_class(monuseg_dir: Path) -> None:
    ds, _ = _open(monuseg_dir, size=64)
    assert ds.scheme.name == "nucleus" and ds.num_classes == 2
    item = ds[0]
    assert item["y"].shape == (3, 64, 64) and item["image"].shape == (3, 64, 64)


def test_fixed_crops_are_deterministic_and_cycle(consep_dir: Path) -> None:
    ds, _ = _open(consep_dir)
    names = ds.names[:2]
    crops = fixed_crops(ds, names, 5)
    assert [c["name"] for c in crops] == [names[0], names[1], names[0], names[1], names[0]]
    tile = ds.read(names[0])
    assert np.array_equal(crops[0]["image"], tile.image[112:144, 112:144])  # centre
    assert np.array_equal(crops[2]["image"], tile.image[:32, :32])  # then the corners
    assert crops[0]["y"].shape == (6, 32, 32)


def test_missing_data_folder() -> None:
    with pytest.raises(DataFormatError, match="data folder not found"):
        _open(Path("/nonexistent/tiles"))


def test_empty_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no tiles found"):
        _open(tmp_path)


def test_holdout_pattern_matching_nothing(consep_dir: Path) -> None:
    with pytest.raises(ConfigError, match="data.holdout: pattern 'val_\\*' matches no tile"):
        _open(consep_dir, holdout=["val_*"])


def test_holding_out_everything(consep_dir: Path) -> None:
    with pytest.raises(DataFormatError, match="no training tiles left after data.holdout"):
        _open(consep_dir, holdout=["*"])


def test_tile_smaller_than_the_crop(consep_dir: Path) -> None:
    ds, _ = _open(consep_dir, size=512)
    with pytest.raises(DataFormatError, match="tile is 256x256, smaller than the model's image size 512"):
        ds[0]


def test_missing_stain_target(consep_dir: Path) -> None:
    with pytest.raises(DataFormatError, match="data.stain_target: .*not found"):
        _open(consep_dir, stain_target="/nonexistent/target.png")


def test_corrupt_tile_is_named(consep_dir: Path, tmp_path: Path) -> None:
    for name in ("train_1_000", "train_1_001"):
        for ext in (".png", ".npz"):
            shutil.copy(consep_dir / f"{name}{ext}", tmp_path / f"{name}{ext}")
    shutil.copy(consep_dir / "classes.json", tmp_path / "classes.json")
    (tmp_path / "train_1_001.npz").write_bytes(b"not a zip")
    ds, _ = _open(tmp_path)
    bad = ds.names.index("train_1_001")
    k = next(k for k in range(10) if ds.tile_index(k) == bad)
    with pytest.raises(DataFormatError, match="train_1_001.npz: corrupt or unreadable"):
        ds[k]


def test_stain_normalisation_to_a_target_tile(consep_dir: Path) -> None:
    from diffaug.data import StainNormalizer, read_image

    target = consep_dir / "train_10_000.png"
    ds, _ = _open(consep_dir, stain_target=str(target), stain_method="macenko")
    name = ds.names[ds.tile_index(0)]
    raw = read_image(consep_dir / f"{name}.png")
    expected = StainNormalizer("macenko").fit(read_image(target)).transform(raw)
    tile = ds.read(name)
    assert np.array_equal(tile.image, expected) and not np.array_equal(tile.image, raw)
    again, _ = _open(consep_dir, stain_target=str(target), stain_method="macenko")
    assert torch.equal(ds[0]["image"], again[0]["image"])  # deterministic, so resumable


def test_cache_keeps_tiles(consep_dir: Path) -> None:
    ds, _ = _open(consep_dir, cache=True)
    first = ds[0]
    assert len(ds.cache) == 1  # type: ignore[arg-type]
    assert torch.equal(first["image"], ds[0]["image"])


def test_tile_folder_scheme_is_merged_once(consep_dir: Path) -> None:
    ds, _ = _open(consep_dir)
    assert isinstance(ds.folder, TileFolder) and ds.folder.merged
    assert max(int(ds.read(n).type_map.max()) for n in ds.names[:30]) <= 4
