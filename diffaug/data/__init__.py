"""Readers and writers of the nuclei dataset formats, class schemes, patching and stain normalisation.

Every reader returns :class:`Tile` objects in a named class scheme (merged exactly once, at load), and
:func:`write_tile_folder` converts any of them to diffaug's tile folder. Stain normalisation needs the optional
extra ``diffaug[stain]``; staintools is imported only when a :class:`StainNormalizer` is made.
"""

from diffaug.data.hovernet import read_hovernet_npy, write_hovernet_npy
from diffaug.data.mat import read_consep_mat, read_lizard_mat, write_consep_mat
from diffaug.data.monuseg import rasterize_polygons, read_monuseg, read_monuseg_polygons, read_monuseg_xml
from diffaug.data.pannuke import PanNukeFold, read_pannuke
from diffaug.data.patches import Patch, extract_patches, extract_tile_patches, patch_grid, tissue_mask, window_starts
from diffaug.data.schemes import (INSTANCE_ONLY, MERGES, SCHEMES, ClassMerge, ClassScheme, apply_merge, get_merge,
                                  get_scheme, resolve_classes)
from diffaug.data.stain import StainNormalizer, stain_matrix, standardize_brightness
from diffaug.data.tiles import (Tile, TileFolder, check_label_maps, check_tile_maps, read_image, read_label_npz,
                                write_classes_json, write_tile, write_tile_folder)

__all__ = [
    "INSTANCE_ONLY", "MERGES", "SCHEMES", "ClassMerge", "ClassScheme", "apply_merge", "get_merge", "get_scheme",
    "resolve_classes",
    "Tile", "TileFolder", "check_label_maps", "check_tile_maps", "read_image", "read_label_npz", "write_classes_json",
    "write_tile", "write_tile_folder",
    "read_consep_mat", "write_consep_mat", "read_lizard_mat", "PanNukeFold", "read_pannuke",
    "read_hovernet_npy", "write_hovernet_npy",
    "read_monuseg", "read_monuseg_xml", "read_monuseg_polygons", "rasterize_polygons",
    "StainNormalizer", "stain_matrix", "standardize_brightness",
    "Patch", "extract_patches", "extract_tile_patches", "patch_grid", "tissue_mask", "window_starts",
]
