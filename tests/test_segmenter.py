"""The HoVer-Net-style segmenter: model, checkpoint, targets/loss, post-processing, training, inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffaug.data import TileFolder
from diffaug.data.tiles import Tile
from diffaug.errors import ConfigError, InvalidInputError, WeightsError
from diffaug.labels import hv_maps
from diffaug.metrics import panoptic_quality
from diffaug.segmenter import (
    Segmenter,
    SegmenterConfig,
    TrainingSettings,
    hovernet_loss,
    hovernet_targets,
    instances_from_hv,
    segment,
    train_segmenter,
    types_from_probabilities,
)
from diffaug.segmenter.model import SegmenterOutput

TINY = SegmenterConfig(num_classes=5, channels=(8, 16))


@pytest.fixture(scope="module")
def consep_tiles(consep_dir):
    folder = TileFolder(consep_dir)
    # Four tiles of four source images, with 45-90 nuclei each.
    return [folder.read(n) for n in ("train_7_000", "train_10_000", "train_24_009", "train_6_003")]


def test_forward_shapes_and_instance_only_model():
    x = torch.rand(2, 3, 32, 48)
    out = Segmenter(TINY, generator=torch.Generator().manual_seed(0))(x)
    assert out.np.shape == (2, 2, 32, 48) and out.hv.shape == (2, 2, 32, 48) and out.tp.shape == (2, 5, 32, 48)
    plain = Segmenter(SegmenterConfig(num_classes=0, channels=(8, 16)))
    assert plain.tp_decoder is None and plain(x).tp is None
    with pytest.raises(ValueError, match="multiples of 2"):
        plain(torch.rand(1, 3, 33, 32))


def test_initialisation_comes_from_the_injected_generator_only():
    a = Segmenter(TINY, generator=torch.Generator().manual_seed(3)).state_dict()
    torch.rand(5)  # touching the global generator must not matter
    b = Segmenter(TINY, generator=torch.Generator().manual_seed(3)).state_dict()
    c = Segmenter(TINY, generator=torch.Generator().manual_seed(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_roundtrip_is_exact_and_strict(tmp_path):
    cfg = SegmenterConfig(num_classes=3, channels=(8, 16), class_names={1: "a", 2: "b"}, scheme="custom",
                          provenance={"steps": 5})
    model = Segmenter(cfg, generator=torch.Generator().manual_seed(0)).eval()
    model.save_pretrained(tmp_path / "seg")
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Segmenter.from_pretrained(tmp_path / "seg")
    assert loaded.config == cfg
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x).tp, loaded(x).tp)
    # A config that does not match the weights, a foreign config and a missing folder are clear errors.
    data = json.loads((tmp_path / "seg" / "config.json").read_text())
    (tmp_path / "seg" / "config.json").write_text(json.dumps({**data, "num_classes": 4,
                                                              "class_names": {}}))
    with pytest.raises(WeightsError, match="do not match"):
        Segmenter.from_pretrained(tmp_path / "seg")
    (tmp_path / "seg" / "config.json").write_text(json.dumps({**data, "model_type": "other"}))
    with pytest.raises(WeightsError, match="not a diffaug segmenter"):
        Segmenter.from_pretrained(tmp_path / "seg")
    with pytest.raises(WeightsError, match="not a segmenter checkpoint"):
        Segmenter.from_pretrained(tmp_path / "missing")


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="num_classes"):
        SegmenterConfig(num_classes=1)
    with pytest.raises(ConfigError, match="channels"):
        SegmenterConfig(channels=(8,))
    with pytest.raises(ConfigError, match="class_names"):
        SegmenterConfig(num_classes=3, class_names={1: "a"})


def test_postprocessing_recovers_real_instances_from_true_targets(consep_tiles):
    # With the true nucleus mask and true HV maps as "predictions", the watershed must give back the annotation:
    # touching nuclei are split by the HV drop, and no nucleus is merged away.
    pqs = []
    for tile in consep_tiles:
        pred = instances_from_hv((tile.inst_map > 0).astype(np.float32), hv_maps(tile.inst_map))
        _, _, pq = panoptic_quality(tile.inst_map, pred)
        pqs.append(pq)
        # A binary connected-component labelling is much worse on crowded tiles: the HV maps do the splitting.
    assert min(pqs) > 0.85, pqs
    crowded = consep_tiles[3]
    from scipy import ndimage as ndi

    components, _ = ndi.label(crowded.inst_map > 0)
    assert panoptic_quality(crowded.inst_map, components)[2] < min(pqs) - 0.1


def test_postprocessing_keeps_foreground_without_markers_and_removes_specks():
    prob = np.zeros((40, 40), np.float32)
    prob[5:8, 5:9] = 1.0  # 12 px: too thin for a marker after opening, kept as its own instance
    prob[20:22, 20:22] = 1.0  # 4 px speck: removed (min_size 10)
    hv = np.zeros((2, 40, 40), np.float32)
    hv[:, 5:8, 5:9] = 5.0 * np.random.default_rng(0).standard_normal((2, 3, 4))  # wild HV: no low-energy core
    inst = instances_from_hv(prob, hv)
    assert inst.max() == 1 and (inst > 0).sum() == 12 and inst[21, 21] == 0


def test_types_take_the_majority_foreground_class():
    inst = np.zeros((4, 6), np.int32)
    inst[:, :3], inst[:, 3:] = 1, 2
    tp = np.zeros((3, 4, 6), np.float32)
    tp[0] = 0.9  # background is ignored inside a predicted nucleus
    tp[1, :, :3], tp[2, :1, :3] = 0.5, 0.6  # nucleus 1: 9 pixels class 1, 3 pixels class 2
    tp[2, :, 3:] = 0.8
    type_map, inst_type = types_from_probabilities(inst, tp)
    assert inst_type.tolist() == [1, 2]
    assert (type_map[:, :3] == 1).all() and (type_map[:, 3:] == 2).all()


def test_targets_and_loss_are_finite_and_lowest_at_the_truth(consep_tiles):
    tile = consep_tiles[0]
    t = hovernet_targets(tile.inst_map[:64, :64], tile.type_map[:64, :64])
    assert set(t) == {"np", "hv", "tp"} and t["hv"].shape == (2, 64, 64)
    batch = {k: torch.from_numpy(v)[None] for k, v in t.items()}
    onehot = lambda a, k: torch.nn.functional.one_hot(a, k).permute(0, 3, 1, 2).float() * 20 - 10  # noqa: E731
    perfect = SegmenterOutput(np=onehot(batch["np"], 2), hv=batch["hv"].clone(), tp=onehot(batch["tp"], 5))
    wrong = SegmenterOutput(np=-perfect.np, hv=-batch["hv"], tp=perfect.tp.roll(1, dims=1))
    best, parts = hovernet_loss(perfect, batch)
    worst, _ = hovernet_loss(wrong, batch)
    assert parts["hv_mse"] == 0 and parts["hv_msge"] == 0 and float(best) < 0.05 < float(worst)


def test_training_is_deterministic_and_lowers_the_loss(consep_tiles):
    settings = TrainingSettings(steps=6, batch_size=2, patch_size=64, lr=3e-3, seed=1)
    losses: list[float] = []
    a = train_segmenter(consep_tiles, TINY, settings, progress=False,
                        on_step=lambda step, parts: losses.append(parts["total"]))
    b = train_segmenter(consep_tiles, TINY, settings, progress=False)
    c = train_segmenter(consep_tiles, TINY, TrainingSettings(steps=6, batch_size=2, patch_size=64, lr=3e-3, seed=2),
                        progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])


def test_segment_any_size_and_instance_only(consep_tiles):
    model = Segmenter(TINY, generator=torch.Generator().manual_seed(0))
    images = [consep_tiles[0].image[:70, :90], consep_tiles[1].image[:64, :64], consep_tiles[2].image[:70, :90]]
    out = segment(model, images, batch_size=2)
    assert [o.inst_map.shape for o in out] == [(70, 90), (64, 64), (70, 90)]
    assert all(o.type_map is not None and o.type_map.shape == o.inst_map.shape for o in out)
    assert all(((o.type_map > 0) == (o.inst_map > 0)).all() for o in out)
    plain = Segmenter(SegmenterConfig(num_classes=0, channels=(8, 16)), generator=torch.Generator().manual_seed(0))
    assert segment(plain, images[:1])[0].type_map is None
    with pytest.raises(InvalidInputError, match="uint8"):
        segment(model, [images[0].astype(np.float32)])


def test_training_bad_input(consep_tiles):
    tile = consep_tiles[0]
    with pytest.raises(ConfigError, match="multiple of 2"):
        train_segmenter([tile], TINY, TrainingSettings(steps=1, patch_size=63), progress=False)
    with pytest.raises(ConfigError, match="smaller than patch_size"):
        train_segmenter([tile], TINY, TrainingSettings(steps=1, patch_size=512), progress=False)
    no_types = Tile(tile.name, tile.image, tile.inst_map)
    with pytest.raises(InvalidInputError, match="no type_map"):
        train_segmenter([no_types], TINY, TrainingSettings(steps=1, patch_size=64), progress=False)
    three = SegmenterConfig(num_classes=3, channels=(8, 16))
    with pytest.raises(InvalidInputError, match="outside the segmenter's classes"):
        train_segmenter([tile], three, TrainingSettings(steps=1, patch_size=64), progress=False)
    with pytest.raises(ConfigError, match="steps"):
        TrainingSettings(steps=0)
