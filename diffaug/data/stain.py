"""Stain normalisation (Vahadane, Macenko) through staintools: fit one target tile per dataset, transform the rest.

NASDM's recipe (SPEC §5): tissue pixels are those with CIELAB lightness below 0.8; the stain matrix is a K=2
dictionary learnt on their optical densities with λ=0.1 (Vahadane) or the extreme angles of their two principal
directions (Macenko); concentrations come from a non-negative lasso with λ=0.01; brightness is standardised to the
90th lightness percentile first. The source's concentrations are rescaled so their 99th percentiles match the
target's, then rendered with the target's stain matrix.

staintools (``pip install 'diffaug[stain]'``, with ``spams``) provides every step. One is called differently:
staintools' Vahadane extractor runs spams' dictionary learning for one wall-clock *second* (``iter=-1``) on all
threads, so its result depends on machine load and changes from run to run. Here the same call runs a fixed number
of iterations on one thread, which is deterministic. Measured on the CoNSeP tile ``train_10_000``: 1,000 iterations
take about 0.15 s and agree with staintools' one-second result to within 1e-3 per matrix entry.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from diffaug.errors import InvalidInputError, MissingExtraError

__all__ = ["StainNormalizer", "stain_matrix", "standardize_brightness"]

StainMethod = Literal["vahadane", "macenko"]


def _staintools() -> Any:
    """Import staintools lazily; its OpenCV build needs libGL, so it is an optional extra."""
    try:
        import spams  # noqa: F401
        import staintools
    except ImportError as exc:  # chained: a missing libGL (staintools' OpenCV) shows up in the cause
        raise MissingExtraError("staintools", "stain", "Stain normalisation") from exc
    return staintools


def _check_image(image: Any, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(f"{what} must be RGB uint8 (H, W, 3), got "
                                f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    return np.ascontiguousarray(image)


def standardize_brightness(image: np.ndarray, percentile: float = 90.0) -> np.ndarray:
    """Scale CIELAB lightness so that its ``percentile`` becomes white (staintools' ``LuminosityStandardizer``)."""
    image = _check_image(image, "image")
    if not 0.0 < percentile <= 100.0:
        raise InvalidInputError(f"percentile must be in (0, 100], got {percentile}")
    return _staintools().LuminosityStandardizer.standardize(image.copy(), percentile=percentile)


def stain_matrix(image: np.ndarray, method: StainMethod = "vahadane", *, luminosity_threshold: float = 0.8,
                 dictionary_iterations: int = 1000) -> np.ndarray:
    """The (2, 3) stain matrix of ``image`` (rows: haematoxylin, eosin; unit-norm optical densities of R, G, B)."""
    image = _check_image(image, "image")
    if method not in ("vahadane", "macenko"):
        raise InvalidInputError(f"unknown stain method {method!r}; use 'vahadane' or 'macenko'")
    st = _staintools()
    from staintools.miscellaneous.exceptions import TissueMaskException
    from staintools.miscellaneous.optical_density_conversion import convert_RGB_to_OD
    from staintools.tissue_masks.luminosity_threshold_tissue_locator import LuminosityThresholdTissueLocator

    try:
        if method == "macenko":
            return st.MacenkoStainExtractor.get_stain_matrix(image.copy(), luminosity_threshold=luminosity_threshold)
        mask = LuminosityThresholdTissueLocator.get_tissue_mask(image, luminosity_threshold=luminosity_threshold)
    except TissueMaskException:
        raise InvalidInputError(f"image has no tissue: no pixel is darker than lightness {luminosity_threshold}; "
                                "pick a tile with tissue") from None
    import spams

    od = convert_RGB_to_OD(image.copy()).reshape(-1, 3)[mask.reshape(-1)]  # copy: staintools edits in place
    # Vahadane et al.: sparse non-negative dictionary learning, D ∈ R^{3×2}, ||α||_1 penalty λ = 0.1.
    dictionary = spams.trainDL(X=np.asfortranarray(od.T), K=2, lambda1=0.1, mode=2, modeD=0, posAlpha=True,
                               posD=True, verbose=False, iter=int(dictionary_iterations), numThreads=1).T
    if dictionary[0, 0] < dictionary[1, 0]:  # haematoxylin first: it absorbs red most
        dictionary = dictionary[[1, 0]]
    return dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)


class StainNormalizer:
    """Map the stain of any H&E image onto a target's (fit once per dataset, on one representative tile).

    Args:
        method: ``"vahadane"`` (NASDM's choice) or ``"macenko"`` (faster, no dictionary learning).
        brightness_percentile: standardise lightness to this percentile before fitting and transforming (NASDM:
            90); None skips it.
        luminosity_threshold: pixels darker than this CIELAB lightness are tissue (0.8).
        dictionary_iterations: spams iterations of Vahadane's dictionary learning (module docstring).

    Example:
        >>> normalizer = StainNormalizer("vahadane").fit(target_tile.image)  # doctest: +SKIP
        >>> normalized = normalizer.transform(tile.image)  # doctest: +SKIP
    """

    def __init__(self, method: StainMethod = "vahadane", *, brightness_percentile: float | None = 90.0,
                 luminosity_threshold: float = 0.8, dictionary_iterations: int = 1000) -> None:
        if method not in ("vahadane", "macenko"):
            raise InvalidInputError(f"unknown stain method {method!r}; use 'vahadane' or 'macenko'")
        if not 0.0 < luminosity_threshold <= 1.0:
            raise InvalidInputError(f"luminosity_threshold must be in (0, 1], got {luminosity_threshold}")
        if dictionary_iterations < 1:
            raise InvalidInputError(f"dictionary_iterations must be >= 1, got {dictionary_iterations}")
        _staintools()  # fail at construction, not halfway through a dataset
        self.method = method
        self.brightness_percentile = brightness_percentile
        self.luminosity_threshold = luminosity_threshold
        self.dictionary_iterations = dictionary_iterations
        self.stain_matrix_target: np.ndarray | None = None
        self.max_concentrations_target: np.ndarray | None = None

    def _prepare(self, image: np.ndarray, what: str) -> np.ndarray:
        image = _check_image(image, what)
        if self.brightness_percentile is not None:
            image = standardize_brightness(image, self.brightness_percentile)
        return image

    def _decompose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stain matrix (2, 3) and concentrations (H·W, 2) of a prepared image."""
        from staintools.miscellaneous.get_concentrations import get_concentrations

        matrix = stain_matrix(image, self.method, luminosity_threshold=self.luminosity_threshold,
                              dictionary_iterations=self.dictionary_iterations)
        # Non-negative lasso, λ = 0.01: OD ≈ C · matrix.
        return matrix, get_concentrations(image.copy(), matrix)

    def fit(self, target: np.ndarray) -> StainNormalizer:
        """Learn the target's stain matrix and 99th-percentile concentrations. Returns self."""
        matrix, conc = self._decompose(self._prepare(target, "target"))
        self.stain_matrix_target = matrix
        self.max_concentrations_target = np.percentile(conc, 99, axis=0).reshape(1, 2)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """Return ``image`` (RGB uint8) in the target's stain: same shape, uint8; deterministic."""
        if self.stain_matrix_target is None or self.max_concentrations_target is None:
            raise InvalidInputError("StainNormalizer.transform called before fit(target)")
        prepared = self._prepare(image, "image")
        _, conc = self._decompose(prepared)
        max_source = np.percentile(conc, 99, axis=0).reshape(1, 2)
        if (max_source <= 0).any():
            raise InvalidInputError("image has (almost) no stain of one kind (99th-percentile concentration 0); "
                                    "it cannot be normalised")
        conc = conc * (self.max_concentrations_target / max_source)
        # Beer-Lambert: I = 255 · exp(-C · M_target), rounded to the nearest 8-bit value.
        rgb = 255.0 * np.exp(-conc @ self.stain_matrix_target)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(prepared.shape)
