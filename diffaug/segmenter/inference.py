"""Segment images with a trained :class:`~diffaug.segmenter.Segmenter`: forward pass + post-processing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from diffaug.errors import InvalidInputError
from diffaug.labels.instances import instance_centroids
from diffaug.segmenter.model import Segmenter
from diffaug.segmenter.postprocess import instances_from_hv, types_from_probabilities

__all__ = ["Segmentation", "segment"]


@dataclass
class Segmentation:
    """The segmenter's answer for one image. ``type_map``/``inst_type`` are None for an instance-only model."""

    inst_map: np.ndarray
    type_map: np.ndarray | None
    inst_type: np.ndarray | None

    @property
    def centroids(self) -> np.ndarray:
        """(N, 2) centroids in (x, y) order."""
        return instance_centroids(self.inst_map)


def _check_image(image: np.ndarray, i: int) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"image {i}: expected an RGB array (H, W, 3), got "
                                f"{getattr(image, 'shape', type(image).__name__)}")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"image {i}: expected uint8, got {image.dtype}")


def segment(model: Segmenter, images: Sequence[np.ndarray], *, batch_size: int = 4,
            postprocess: dict[str, float] | None = None) -> list[Segmentation]:
    """Instance (and type) maps of uint8 RGB images of any size (padded by reflection to the model's multiple).

    Args:
        model: a trained segmenter (its device is used).
        images: RGB uint8 (H, W, 3) arrays; images of the same size are batched together.
        batch_size: images per forward pass.
        postprocess: keyword arguments of :func:`~diffaug.segmenter.postprocess.instances_from_hv`.
    """
    for i, image in enumerate(images):
        _check_image(image, i)
    model.eval()
    results: list[Segmentation | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            for i, seg in zip(chunk, _segment_batch(model, np.stack([images[i] for i in chunk]), postprocess)):
                results[i] = seg
    return results  # type: ignore[return-value]


@torch.no_grad()
def _segment_batch(model: Segmenter, batch: np.ndarray, postprocess: dict[str, float] | None) -> list[Segmentation]:
    device = next(model.parameters()).device
    m = model.config.size_multiple
    h, w = batch.shape[1:3]
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    out = model(x.to(device))
    np_prob = out.np.softmax(1)[:, 1, :h, :w].cpu().numpy()
    hv = out.hv[:, :, :h, :w].cpu().numpy()
    tp_prob = None if out.tp is None else out.tp.softmax(1)[:, :, :h, :w].cpu().numpy()
    segs = []
    for j in range(batch.shape[0]):
        inst_map = instances_from_hv(np_prob[j], hv[j], **(postprocess or {}))
        if tp_prob is None:
            segs.append(Segmentation(inst_map, None, None))
        else:
            type_map, inst_type = types_from_probabilities(inst_map, tp_prob[j])
            segs.append(Segmentation(inst_map, type_map, inst_type))
    return segs
