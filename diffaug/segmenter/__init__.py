"""A small HoVer-Net-style nuclei segmenter, the yardstick of diffaug's evaluation.

It exists to *measure* synthetic data (label fidelity, downstream gain), not to compete with HoVer-Net: a compact
three-branch UNet (nuclear pixels, horizontal/vertical maps, types) that trains on a tile folder on CPU in minutes,
HoVer-Net's losses, and a marker-controlled watershed from the HV maps to instances with a majority class each.

Example:
    >>> from diffaug.segmenter import Segmenter, SegmenterConfig, TrainingSettings, train_segmenter, segment
    >>> # model = train_segmenter(tiles, SegmenterConfig(num_classes=5), TrainingSettings(steps=1000, seed=0))
    >>> # model.save_pretrained("seg"); Segmenter.from_pretrained("seg"); segment(model, [image])[0].inst_map
"""

from diffaug.segmenter.inference import Segmentation, segment
from diffaug.segmenter.losses import hovernet_loss, hovernet_targets
from diffaug.segmenter.model import Segmenter, SegmenterConfig, SegmenterOutput
from diffaug.segmenter.postprocess import hv_energy, instances_from_hv, types_from_probabilities
from diffaug.segmenter.training import TrainingSettings, augment_crop, check_training_tiles, train_segmenter

__all__ = ["Segmentation", "Segmenter", "SegmenterConfig", "SegmenterOutput", "TrainingSettings", "augment_crop",
           "check_training_tiles", "hovernet_loss", "hovernet_targets", "hv_energy", "instances_from_hv", "segment",
           "train_segmenter", "types_from_probabilities"]
