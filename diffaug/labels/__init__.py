"""Label-map work: pure numpy/scikit-image functions, randomness from an injected ``numpy.random.Generator``."""

from diffaug.labels.instances import (
    instance_areas,
    instance_centroids,
    instance_ids,
    instance_types,
    relabel_sequential,
)

__all__ = ["instance_areas", "instance_centroids", "instance_ids", "instance_types", "relabel_sequential"]
