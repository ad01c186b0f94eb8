"""Training a semantic diffusion model: config, data stream, loop (two stages, EMA, exact resume, DDP), previews.

Most users run it from the command line (``diffaug train --config CONFIG.yaml [key=value ...]``); from Python::

    from diffaug.training import load_config, train
    result = train(load_config("tiny", ["data.root=../shared/data/consep_train", "output_dir=runs/tiny"]))
    result.model_dir  # config.json + model.safetensors, for SemanticUNet.from_pretrained
"""

from diffaug.training.config import TrainConfig, load_config
from diffaug.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
