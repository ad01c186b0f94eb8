"""GradMix, the label-mixing baseline of DiffMix's evaluation, as an Albumentations transform.

GradMix (Doan et al., MICCAI 2022) turns common ("major") nuclei into rare ("minor") ones by pasting minor nuclei
over them and blending the pasted pixels into the tissue. diffaug's version has two halves:

1. **Labels**: the balancing swap of SPEC §1, exactly :func:`diffaug.labels.balance_label_map` (the same edit DiffMix
   renders with its diffusion model): picked major nuclei are cleared and a donor minor nucleus's shape is put on each
   one's centroid, donors from the same tile first, then from the dataset's :class:`~diffaug.labels.DonorBank`.
2. **Image** (this module, written for diffaug; GradMix's own code is GPL-2.0 and was not used):
   a. every cleared major nucleus is erased from the image by inpainting (OpenCV's Telea method, ``cv2.inpaint``)
      over its mask dilated by ``blend_margin`` px, leaving every nucleus that stays untouched;
   b. every donor is pasted with Poisson blending (:func:`poisson_blend`, Pérez et al. 2003, seamless cloning):
      inside the donor's mask dilated by ``blend_margin`` px (again minus the other nuclei), the result keeps the
      donor image's gradients while matching the target image on the region's boundary, so the donor's texture
      comes in without a visible seam or colour jump. The pasted nucleus lands exactly where the edited label map
      has it (same shape, integer offset).

The donor's pixels come from its own tile's image: the input image for same-tile donors, the ``donors`` folder for
bank donors.

Conventions: the transform takes the label maps as ``masks=[inst_map, type_map]`` (int32, the project's convention
for Albumentations, so that spatial transforms move both and neither is interpolated) and returns them edited in the
same order. Randomness comes from the transform's own generator (``A.Compose(..., seed=...)`` reproduces).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema, DualTransform
from pydantic import Field

from diffaug.errors import InvalidInputError
from diffaug.labels import DonorBank, LabelEdit, balance_label_map

__all__ = ["Paste", "blend_nuclei", "gradmix", "GradMixTransform"]


@dataclass(frozen=True)
class Paste:
    """One donor nucleus to paste: its tile's image, its mask there, and its mask in the target image.

    ``donor_mask`` and ``target_mask`` hold the same shape at an integer offset (as the balancing edit pastes it).
    """

    donor_image: np.ndarray
    donor_mask: np.ndarray
    target_mask: np.ndarray


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    import cv2

    if pixels <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _donor_canvas(base: np.ndarray, paste: Paste, region: np.ndarray) -> np.ndarray:
    """``base`` with the donor image laid over ``region`` at the paste's offset (where the donor image reaches)."""
    dy0, dy1, dx0, dx1 = _bbox(paste.donor_mask)
    ty0, ty1, tx0, tx1 = _bbox(paste.target_mask)
    if (dy1 - dy0, dx1 - dx0) != (ty1 - ty0, tx1 - tx0) or not np.array_equal(
            paste.donor_mask[dy0:dy1, dx0:dx1], paste.target_mask[ty0:ty1, tx0:tx1]):
        raise InvalidInputError("Paste: donor_mask and target_mask must hold the same shape (at an integer offset)")
    off_y, off_x = dy0 - ty0, dx0 - tx0  # donor coordinate = target coordinate + offset
    ry0, ry1, rx0, rx1 = _bbox(region)
    # Clip the region's box to where the donor image exists.
    dh, dw = paste.donor_image.shape[:2]
    ry0, rx0 = max(ry0, -off_y), max(rx0, -off_x)
    ry1, rx1 = min(ry1, dh - off_y), min(rx1, dw - off_x)
    canvas = base.copy()
    canvas[ry0:ry1, rx0:rx1] = paste.donor_image[ry0 + off_y:ry1 + off_y, rx0 + off_x:rx1 + off_x]
    return canvas


def poisson_blend(source: np.ndarray, target: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Poisson image editing with imported gradients (Pérez et al., SIGGRAPH 2003, eq. 7-8, "seamless cloning").

    Inside ``region`` (Ω) the result f solves the discrete Poisson equation with the source's Laplacian as guidance
    and the target as Dirichlet boundary on ∂Ω (the 4-neighbours of Ω outside it):

        |N_p| f_p − Σ_{q ∈ N_p ∩ Ω} f_q = Σ_{q ∈ N_p ∩ ∂Ω} target_q + Σ_{q ∈ N_p} (source_p − source_q),

    so the source's texture comes in while its colour level adapts to the target along the boundary. Outside Ω the
    target is returned unchanged. Pixels of Ω on the image border are left out of Ω (they have no full
    neighbourhood). One sparse LU factorisation serves the three channels.

    Args:
        source: RGB uint8 (H, W, 3), the image whose gradients are imported (already aligned with ``target``).
        target: RGB uint8 (H, W, 3).
        region: bool (H, W), Ω.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    height, width = region.shape
    omega = region.copy()
    omega[[0, -1], :] = False
    omega[:, [0, -1]] = False
    ys, xs = np.nonzero(omega)
    out = target.copy()
    n = ys.size
    if n == 0:
        return out
    index = np.full(region.shape, -1, dtype=np.int64)
    index[ys, xs] = np.arange(n)
    src = source.astype(np.float64)
    dst = target.astype(np.float64)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.full(n, 4.0)]
    rhs = np.zeros((n, 3))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        qy, qx = ys + dy, xs + dx  # always inside the image: Ω keeps off the border
        rhs += src[ys, xs] - src[qy, qx]
        inside = index[qy, qx]
        in_omega = inside >= 0
        rows.append(np.flatnonzero(in_omega))
        cols.append(inside[in_omega])
        vals.append(np.full(int(in_omega.sum()), -1.0))
        rhs[~in_omega] += dst[qy[~in_omega], qx[~in_omega]]
    matrix = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    solution = splu(matrix).solve(rhs)
    out[ys, xs] = np.clip(np.rint(solution), 0, 255).astype(np.uint8)
    return out


def _erase(image: np.ndarray, removed: np.ndarray, protected: np.ndarray, margin: int, radius: int) -> np.ndarray:
    """Replace each removed nucleus (dilated by ``margin``, minus protected pixels) by nearby nucleus-free tissue.

    For every connected erased region the nearest displacement at which the whole region lands on background (no
    nucleus within ``margin`` px, inside the image) is found with one binary erosion; the background patch there is
    Poisson-blended in, so the fill keeps the tissue's texture. A region too large for any background patch is tried
    nucleus by nucleus; what still finds no patch is inpainted (Telea), which is smooth but textureless.
    """
    import cv2
    from scipy import ndimage as ndi

    out = image
    erase = _dilate(removed, margin) & ~protected
    background = ~_dilate(protected | removed, margin)
    leftover = np.zeros_like(erase)
    labels, _ = ndi.label(erase)
    for region in (labels == i for i in range(1, int(labels.max()) + 1)):
        out, done = _fill_from_background(out, region, background)
        if done:
            continue
        # A crowded region: try its removed nuclei one by one (each with its own margin ring).
        pieces, _ = ndi.label(removed & region)
        for piece in (pieces == j for j in range(1, int(pieces.max()) + 1)):
            sub = _dilate(piece, margin) & region
            out, done = _fill_from_background(out, sub, background)
            if not done:
                leftover |= sub
        leftover |= region & ~_dilate(removed & region, margin)
    leftover &= erase
    if leftover.any():
        out = cv2.inpaint(out, leftover.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
    return out


def _fill_from_background(image: np.ndarray, region: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, bool]:
    """Poisson-blend the nearest background patch of ``region``'s shape into it; ``(image, False)`` when none fits."""
    import cv2

    height, width = region.shape
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = y1 - y0, x1 - x0
    if y0 < 1 or x0 < 1 or y1 > height - 1 or x1 > width - 1:
        return image, False
    shape = region[y0:y1, x0:x1].astype(np.uint8)
    # fits[y, x]: the region placed with its box's top-left corner at (y, x) covers background only.
    fits = cv2.erode(background.astype(np.uint8), shape, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT,
                     borderValue=0).astype(bool)
    fits[height - h:, :] = False  # keep the patch (and the Poisson boundary) inside the image
    fits[:, width - w:] = False
    fits[:1, :] = False
    fits[:, :1] = False
    cy, cx = np.nonzero(fits)
    if cy.size == 0:
        return image, False
    best = int(np.argmin((cy - y0) ** 2 + (cx - x0) ** 2))
    sy, sx = int(cy[best]), int(cx[best])
    canvas = image.copy()
    canvas[y0:y1, x0:x1] = image[sy:sy + h, sx:sx + w]
    return poisson_blend(canvas, image, region), True


def blend_nuclei(image: np.ndarray, *, removed: np.ndarray, protected: np.ndarray, pastes: Sequence[Paste],
                 blend_margin: int = 3, inpaint_radius: int = 3) -> np.ndarray:
    """Erase ``removed`` nuclei, then Poisson-blend each donor into place (see the module docstring).

    Args:
        image: RGB uint8 (H, W, 3).
        removed: bool (H, W), pixels of the nuclei to erase.
        protected: bool (H, W), pixels of the nuclei that stay as they are (never changed).
        pastes: donors to blend in.
        blend_margin: dilation in px of each erased / pasted mask: the ring in which the blend happens.
        inpaint_radius: neighbourhood radius of the Telea inpainting.

    Returns:
        The blended image (a new array).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"blend_nuclei: image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    out = image.copy()
    if removed.any():
        out = _erase(out, removed, protected, blend_margin, inpaint_radius)
    for paste in pastes:
        others = protected & ~paste.target_mask
        region = _dilate(paste.target_mask, blend_margin) & ~others
        canvas = _donor_canvas(out, paste, region)
        out = poisson_blend(canvas, out, region)
        # Ω leaves out the image border; there the donor's nucleus pixels are copied as they are.
        edge = paste.target_mask.copy()
        edge[1:-1, 1:-1] = False
        out[edge] = canvas[edge]
    return out


def gradmix(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, *, rng: np.random.Generator,
            bank: DonorBank | None = None,
            donor_tile: Callable[[str], tuple[np.ndarray, np.ndarray]] | None = None,
            tile_name: str | None = None, blend_margin: int = 3, inpaint_radius: int = 3,
            **balance_kwargs: Any) -> tuple[np.ndarray, LabelEdit]:
    """GradMix one tile: the balancing label swap, then the image blend. Returns ``(image, edit)``.

    Args:
        image: RGB uint8 (H, W, 3).
        inst_map: (H, W) instance ids.
        type_map: (H, W) classes.
        rng: all randomness (which nuclei, which donors).
        bank: the dataset's donors (see :func:`~diffaug.labels.balance_label_map`).
        donor_tile: ``tile name -> (RGB image, inst_map)`` of the bank's tiles, for donors from other tiles; needed
            when the bank may give such donors. The donor's id refers to that ``inst_map``.
        tile_name: this tile's name in the bank (so its own donors are not taken twice).
        blend_margin: see :func:`blend_nuclei`.
        inpaint_radius: see :func:`blend_nuclei`.
        **balance_kwargs: passed to :func:`~diffaug.labels.balance_label_map` (``rare_classes``, ``ratio``,
            ``dilation_iterations``, ``size_ratio``, ``border_margin``, ``donor_source``, ...).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"gradmix: image must be RGB uint8 (H, W, 3), got "
                                f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if getattr(inst_map, "shape", None) != image.shape[:2]:
        raise InvalidInputError(f"gradmix: image {image.shape[:2]} and inst_map {getattr(inst_map, 'shape', None)} "
                                "differ in shape")
    edit = balance_label_map(inst_map, type_map, rng=rng, bank=bank, tile_name=tile_name, **balance_kwargs)
    replaced = edit.record["replaced"]
    if not replaced:
        return image.copy(), edit
    # Output nucleus j+1 came from input id source_ids[j]; replaced nuclei keep their id, so look them up by it.
    out_id = {int(s): j + 1 for j, s in enumerate(edit.source_ids.tolist())}
    removed = np.isin(inst_map, [r["source_id"] for r in replaced])
    protected = (edit.inst_map > 0) & ~np.isin(edit.inst_map, [out_id[r["source_id"]] for r in replaced])
    pastes = []
    for r in replaced:
        donor = r["donor"]
        if donor["same_tile"]:
            src_image, src_mask = image, inst_map == donor["id"]
        else:
            if donor_tile is None:
                raise InvalidInputError("gradmix: a donor came from another tile of the bank, but no donor_tile "
                                        "reader was given")
            src_image, src_inst = donor_tile(donor["tile"])
            src_mask = src_inst == donor["id"]
        pastes.append(Paste(src_image, src_mask, edit.inst_map == out_id[r["source_id"]]))
    blended = blend_nuclei(image, removed=removed, protected=protected, pastes=pastes, blend_margin=blend_margin,
                           inpaint_radius=inpaint_radius)
    return blended, edit



class GradMixTransform(DualTransform):
    """GradMix as an Albumentations 2.0.8 ``DualTransform``: balancing label swap + inpainting/Poisson image blend.

    Args:
        donors: tile folder (path) whose rare nuclei donate to every tile (the dataset-level
            :class:`~diffaug.labels.DonorBank`, read in its default classes); ``None`` uses only each tile's own rare
            nuclei, and then ``rare_classes`` is required.
        rare_classes: the minor classes; default: the rare classes of the ``donors`` folder.
        ratio: share of the eligible major nuclei to convert (DiffMix/GradMix: 0.8).
        dilation_iterations: dilations of a major nucleus before donor size matching (2).
        size_ratio: a donor fits when dilated major area >= size_ratio x donor area (2.3).
        border_margin: majors with a centroid closer than this to the border are kept (default: 30 px, scaled down
            on inputs under 256 px; :func:`~diffaug.labels.default_border_margin`).
        donor_source: ``"same-tile-first"``, ``"same-tile"`` or ``"dataset"``.
        blend_margin: width in px of the ring in which erased and pasted nuclei are blended.
        inpaint_radius: Telea inpainting radius.
        p: probability of applying the transform.

    Targets: ``image`` (RGB uint8) and ``masks=[inst_map, type_map]`` (int32). Serialisable with ``A.to_dict``.

    Example:
        >>> import albumentations as A
        >>> from diffaug.assets import sample_tiles_dir
        >>> from diffaug.data import TileFolder
        >>> tile = TileFolder(sample_tiles_dir())[0]
        >>> aug = A.Compose([GradMixTransform(donors=str(sample_tiles_dir()), p=1.0)], seed=0)
        >>> out = aug(image=tile.image, masks=[tile.inst_map, tile.type_map])
        >>> out["image"].shape, len(out["masks"])
        ((256, 256, 3), 2)
    """

    class InitSchema(BaseTransformInitSchema):
        donors: str | None
        rare_classes: tuple[int, ...] | None
        ratio: float = Field(ge=0.0, le=1.0)
        dilation_iterations: int = Field(ge=0)
        size_ratio: float = Field(gt=0.0)
        border_margin: float | None = Field(default=None, ge=0.0)
        donor_source: Literal["same-tile-first", "same-tile", "dataset"]
        blend_margin: int = Field(ge=0)
        inpaint_radius: int = Field(ge=1)

    def __init__(self, donors: str | os.PathLike[str] | None = None, rare_classes: Sequence[int] | None = None,
                 ratio: float = 0.8, dilation_iterations: int = 2, size_ratio: float = 2.3,
                 border_margin: float | None = None, donor_source: Literal["same-tile-first", "same-tile", "dataset"] =
                 "same-tile-first", blend_margin: int = 3, inpaint_radius: int = 3, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.donors = None if donors is None else str(donors)
        self.rare_classes = None if rare_classes is None else tuple(int(c) for c in rare_classes)
        self.ratio = ratio
        self.dilation_iterations = dilation_iterations
        self.size_ratio = size_ratio
        self.border_margin = border_margin
        self.donor_source = donor_source
        self.blend_margin = blend_margin
        self.inpaint_radius = inpaint_radius
        if self.donors is None and self.rare_classes is None:
            raise InvalidInputError("GradMixTransform: give donors=FOLDER (its rare classes are used) or "
                                    "rare_classes=[...] (same-tile donors only)")
        if self.donors is None and donor_source == "dataset":
            raise InvalidInputError("GradMixTransform: donor_source='dataset' needs donors=FOLDER")
        self._bank: DonorBank | None = None
        self._folder: Any = None
        self._tile_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _donor_bank(self) -> DonorBank | None:
        if self.donors is None:
            return None
        if self._bank is None:
            from diffaug.data.tiles import TileFolder

            self._folder = TileFolder(self.donors)
            self._bank = DonorBank.from_folder(self._folder, rare_classes=self.rare_classes)
        return self._bank

    def _donor_tile(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._tile_cache:
            tile = self._folder.read(name)
            self._tile_cache[name] = (tile.image, tile.inst_map)
            if len(self._tile_cache) > 64:  # a small LRU: donors cluster on the few tiles rich in rare nuclei
                self._tile_cache.popitem(last=False)
        self._tile_cache.move_to_end(name)
        return self._tile_cache[name]

    @property
    def targets_as_params(self) -> list[str]:
        return ["image", "masks"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        masks = data.get("masks")
        if masks is None or len(masks) != 2:
            raise InvalidInputError("GradMixTransform: pass the label maps as masks=[inst_map, type_map] (two maps), "
                                    f"got {0 if masks is None else len(masks)}")
        inst_map, type_map = np.asarray(masks[0]), np.asarray(masks[1])
        image, edit = gradmix(np.asarray(data["image"]), inst_map, type_map, rng=self.random_generator,
                              bank=self._donor_bank(), donor_tile=self._donor_tile,
                              rare_classes=self.rare_classes if self.donors is None else None, ratio=self.ratio,
                              dilation_iterations=self.dilation_iterations, size_ratio=self.size_ratio,
                              border_margin=self.border_margin, donor_source=self.donor_source,
                              blend_margin=self.blend_margin, inpaint_radius=self.inpaint_radius)
        return {"gradmix_image": image, "gradmix_inst_map": edit.inst_map, "gradmix_type_map": edit.type_map,
                "gradmix_record": edit.record}

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return params["gradmix_image"]

    def apply_to_masks(self, masks: Any, **params: Any) -> Any:
        out = [params["gradmix_inst_map"].astype(np.int32), params["gradmix_type_map"].astype(np.int32)]
        return np.stack(out) if isinstance(masks, np.ndarray) else out

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        raise InvalidInputError("GradMixTransform: pass the label maps as masks=[inst_map, type_map], not mask=")

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("donors", "rare_classes", "ratio", "dilation_iterations", "size_ratio", "border_margin",
                "donor_source", "blend_margin", "inpaint_radius")
