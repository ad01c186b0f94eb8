"""Readers and writers of the nuclei dataset formats, class schemes, patching and stain normalisation."""

from diffaug.data.schemes import MERGES, SCHEMES, ClassMerge, ClassScheme, apply_merge, get_merge, get_scheme
from diffaug.data.tiles import Tile, TileFolder, check_label_maps, read_image, read_label_npz, write_classes_json, write_tile

__all__ = ["MERGES", "SCHEMES", "ClassMerge", "ClassScheme", "apply_merge", "get_merge", "get_scheme", "Tile",
           "TileFolder", "check_label_maps", "read_image", "read_label_npz", "write_classes_json", "write_tile"]
