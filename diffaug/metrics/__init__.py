"""Nuclei segmentation and classification metrics with HoVer-Net's definitions (Graham et al. 2019).

- Instance metrics of one image: :func:`dice`, :func:`aji`, :func:`aji_plus`, :func:`panoptic_quality`, or all at
  once with :func:`instance_stats`.
- Detection and classification over a set of images: :func:`type_stats` (F_d, accuracy, per-class F1).

All match the original HoVer-Net evaluation code to 1e-6 (golden values in ``shared/fixtures/hovernet_metrics``),
and are vectorised: one overlap table per image instead of one mask per nucleus.
"""

from diffaug.metrics.detection import instance_points, pair_coordinates, require_class_labels, type_stats
from diffaug.metrics.instance import (
    OverlapTable,
    aji,
    aji_plus,
    dice,
    instance_stats,
    overlap_table,
    panoptic_quality,
)

__all__ = ["OverlapTable", "aji", "aji_plus", "dice", "instance_points", "instance_stats", "overlap_table",
           "pair_coordinates", "panoptic_quality", "require_class_labels", "type_stats"]
