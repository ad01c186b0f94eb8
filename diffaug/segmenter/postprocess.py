"""From the segmenter's per-pixel outputs to instances and classes (pure numpy / scipy / scikit-image).

Instance recovery follows HoVer-Net's marker-controlled watershed (Graham et al. 2019, Sec. 3.3.2), written from the
paper's description:

1. **Foreground.** ``fg = p_np >= threshold`` (the NP branch's nucleus probability); connected pieces smaller than
   ``min_size`` pixels are dropped.
2. **Edge energy from the HV maps.** Inside one nucleus the horizontal map ``h`` rises from -1 (left edge) to +1
   (right edge), and the vertical map ``v`` from -1 (top) to +1 (bottom). Where two nuclei touch, ``h`` *drops* from
   +1 to -1 across a left/right boundary and ``v`` drops across a top/bottom one. The energy is therefore the
   largest *decrease* of the maps along their own axis,

       E = max(0, -∂h/∂x, -∂v/∂y),

   with the derivatives taken by a Gaussian-derivative filter of scale ``sigma`` (in pixels, so E is "HV units per
   pixel"). HoVer-Net computes signed Sobel derivatives (ksize 21) and min-max normalises them per image; we keep the
   signed-decrease idea but threshold an absolute, per-pixel quantity, which does not depend on what else is in the
   image (a tile with one isolated nucleus is not normalised differently from a crowded one).
3. **Markers.** ``fg & (E < marker_threshold)``: nucleus cores, away from every boundary. They are opened with a
   small disk, labelled, and markers smaller than ``min_marker_size`` are dropped.
4. **Watershed.** Markers grow over the landscape ``E`` (smoothed with the same Gaussian) inside ``fg``
   (scikit-image's marker-controlled watershed). Foreground pieces that hold no marker keep their connected-component
   label, so no predicted nucleus pixel is lost.
5. Instances smaller than ``min_size`` are removed and ids renumbered 1..N.

Classes (HoVer-Net's rule): every pixel takes the most likely *foreground* class of the TP branch, and every instance
takes the majority class of its pixels (ties to the lower class).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from diffaug.errors import InvalidInputError
from diffaug.labels.instances import instance_types, relabel_sequential

__all__ = ["instances_from_hv", "types_from_probabilities", "hv_energy"]


def hv_energy(hv: np.ndarray, *, sigma: float = 1.0) -> np.ndarray:
    """Edge energy ``max(0, -∂h/∂x, -∂v/∂y)`` of HV maps ``hv`` (2, H, W) = (horizontal, vertical); see step 2."""
    if hv.ndim != 3 or hv.shape[0] != 2:
        raise InvalidInputError(f"hv must be (2, H, W) = (horizontal, vertical) maps, got shape {hv.shape}")
    h = hv[0].astype(np.float64)
    v = hv[1].astype(np.float64)
    # gaussian_filter's order=(row, col): (0, 1) differentiates along x (columns), (1, 0) along y (rows).
    dh_dx = ndi.gaussian_filter(h, sigma, order=(0, 1), mode="nearest")
    dv_dy = ndi.gaussian_filter(v, sigma, order=(1, 0), mode="nearest")
    return np.maximum(0.0, np.maximum(-dh_dx, -dv_dy)).astype(np.float32)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or labels.max() == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def instances_from_hv(np_prob: np.ndarray, hv: np.ndarray, *, threshold: float = 0.5, marker_threshold: float = 0.15,
                      sigma: float = 0.5, min_size: int = 10, min_marker_size: int = 5) -> np.ndarray:
    """Instance map (int32, ids 1..N) from the NP probability (H, W) and the HV maps (2, H, W). See the module doc.

    Args:
        np_prob: nucleus probability in [0, 1].
        hv: predicted horizontal and vertical maps (values nominally in [-1, 1]).
        threshold: foreground threshold on ``np_prob``.
        marker_threshold: energy (HV decrease per pixel) below which a foreground pixel is a nucleus core. Where two
            round nuclei touch off their centre rows, the maps drop by well under 2 (about 1 is common), and a wide
            Gaussian spreads that drop thinly: 0.15 at ``sigma`` 0.5 keeps those drops as boundaries. On the true HV
            maps of every 6th CoNSeP training tile this gives PQ >= 0.93 (mean 0.985); 0.3 at sigma 1 gave min 0.63.
        sigma: scale of the Gaussian derivative in pixels.
        min_size: smallest instance kept, in pixels.
        min_marker_size: smallest marker kept, in pixels.
    """
    from skimage.morphology import disk
    from skimage.segmentation import watershed

    if np_prob.ndim != 2 or hv.shape[1:] != np_prob.shape:
        raise InvalidInputError(f"np_prob (H, W) and hv (2, H, W) disagree: {np_prob.shape} vs {hv.shape}")
    fg = np_prob >= threshold
    fg_labels, _ = ndi.label(fg)
    fg_labels = _remove_small(fg_labels, min_size)
    fg = fg_labels > 0
    if not fg.any():
        return np.zeros(np_prob.shape, dtype=np.int32)
    energy = hv_energy(hv, sigma=sigma)
    cores = fg & (energy < marker_threshold)
    cores = ndi.binary_opening(cores, structure=disk(1))
    markers, _ = ndi.label(cores)
    markers = _remove_small(markers, min_marker_size)
    # Foreground pieces without any marker become their own instance (never drop predicted nuclei).
    has_marker = np.zeros(int(fg_labels.max()) + 1, dtype=bool)
    has_marker[np.unique(fg_labels[markers > 0])] = True
    orphan = fg & ~has_marker[fg_labels]
    if orphan.any():
        offset = int(markers.max())
        markers = np.where(orphan, fg_labels + offset, markers)
    landscape = ndi.gaussian_filter(energy, sigma)
    inst = watershed(landscape, markers=markers, mask=fg)
    inst = _remove_small(inst, min_size)
    return relabel_sequential(inst).astype(np.int32)


def types_from_probabilities(inst_map: np.ndarray, tp_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance majority class from TP probabilities (K+1, H, W) with background at index 0.

    Returns ``(type_map, inst_type)``: the type map (int32, 0 on background) and the class of instance i+1 at index i.
    ``inst_map`` must have contiguous ids 1..N.
    """
    if tp_prob.ndim != 3 or tp_prob.shape[1:] != inst_map.shape or tp_prob.shape[0] < 2:
        raise InvalidInputError(f"tp_prob must be (K+1, H, W) with K >= 1 matching inst_map {inst_map.shape}, got "
                                f"{tp_prob.shape}")
    pixel_class = (np.argmax(tp_prob[1:], axis=0) + 1).astype(np.int32)  # the pixel is a nucleus: best foreground class
    pixel_class[inst_map == 0] = 0
    inst_type = instance_types(inst_map, pixel_class)
    lut = np.concatenate([[0], inst_type]).astype(np.int32)
    return lut[inst_map], inst_type
