"""Models: the semantic diffusion UNet (SDM/DiffMix) and conversion from original checkpoints."""

from diffaug.models.convert import convert_sdm_checkpoint
from diffaug.models.sdm_unet import SemanticCondition, SemanticUNet, SemanticUNetConfig

__all__ = ["SemanticUNet", "SemanticUNetConfig", "SemanticCondition", "convert_sdm_checkpoint"]
