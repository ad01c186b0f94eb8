"""Label-map work: pure numpy/scikit-image functions, randomness from an injected ``numpy.random.Generator``.

* :func:`sdm_condition` / :func:`instance_edges`: the semantic condition of SDM and DiffMix.
* :func:`balance_label_map` with a :class:`DonorBank`, and :func:`enlarge_label_map`: DiffMix's balancing and
  enlarging maps. Each returns a :class:`LabelEdit` (new maps, ``inst_type``, centroids, a provenance record).
* :func:`validate_label_map` / :func:`label_map_problems`: validity, also against the map before an edit.
* :func:`hv_maps`: HoVer-Net's horizontal/vertical targets.
"""

from diffaug.labels.balance import DonorBank, balance_label_map, default_border_margin, rare_classes_of
from diffaug.labels.condition import instance_edges, sdm_condition
from diffaug.labels.edit import LabelEdit
from diffaug.labels.enlarge import enlarge_label_map
from diffaug.labels.hv import hv_maps
from diffaug.labels.instances import (
    instance_areas,
    instance_centroids,
    instance_ids,
    instance_piece_counts,
    instance_types,
    relabel_sequential,
)
from diffaug.labels.validate import label_map_problems, validate_label_map

__all__ = ["DonorBank", "LabelEdit", "balance_label_map", "default_border_margin", "enlarge_label_map", "hv_maps", "instance_areas",
           "instance_centroids", "instance_edges", "instance_ids", "instance_piece_counts", "instance_types",
           "label_map_problems", "rare_classes_of", "relabel_sequential", "sdm_condition", "validate_label_map"]
