"""A compact HoVer-Net-style segmenter: one UNet encoder and three decoder branches.

HoVer-Net (Graham et al., Medical Image Analysis 58, 2019) predicts, for every pixel,

- **NP** (nuclear pixel): nucleus vs background, 2 logits;
- **HV** (horizontal/vertical): the pixel's horizontal and vertical distance to the centroid of its nucleus, each
  normalised to [-1, 1] per nucleus (the targets of :func:`diffaug.labels.hv_maps`), 2 regression channels;
- **TP** (type): the nucleus class, ``num_classes`` logits with background at index 0 (absent for instance-only data).

The original uses a pre-activated ResNet-50 encoder and dense decoders (tens of millions of parameters). This one keeps
the three-branch design at a size that trains on CPU in minutes: a plain UNet encoder (two conv3x3-GroupNorm-ReLU per
level, max-pool down) shared by three small decoders (bilinear up, skip concatenation, two convs) with a 1×1 head each.
The instance map is recovered by :func:`diffaug.segmenter.postprocess.instances_from_hv`.

The model holds no training or post-processing logic; the checkpoint is ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from diffaug._io import atomic_write_bytes, atomic_write_json
from diffaug.errors import ConfigError, WeightsError

__all__ = ["SegmenterConfig", "Segmenter", "SegmenterOutput", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODEL_TYPE = "diffaug-segmenter"


@dataclass
class SegmenterConfig:
    """Architecture of a :class:`Segmenter` (everything needed to rebuild it from ``config.json``).

    Args:
        num_classes: classes of the type branch **counting background** (HoVer-Net's CoNSeP setting: 5). ``0`` builds
            an instance-only model without a type branch.
        channels: encoder widths, one per level; the image is halved ``len(channels) - 1`` times, so inputs must be
            multiples of ``2 ** (len(channels) - 1)`` (inference pads to that).
        class_names: names of classes 1..K, for reports.
        scheme: name of the class scheme the type branch was trained in (for example ``"consep-hovernet"``).
        provenance: free-form record of how the weights were made (data, steps, seed); not used to build the model.
    """

    num_classes: int = 0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    in_channels: int = 3
    class_names: dict[int, str] = field(default_factory=dict)
    scheme: str = "instance-only"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.class_names = {int(k): str(v) for k, v in self.class_names.items()}
        if self.num_classes == 1 or self.num_classes < 0:
            raise ConfigError(f"SegmenterConfig.num_classes must be 0 (instance-only) or >= 2 (background + "
                              f"classes), got {self.num_classes}")
        if len(self.channels) < 2 or any(c < 4 for c in self.channels):
            raise ConfigError(f"SegmenterConfig.channels needs at least 2 levels of >= 4 channels, got {self.channels}")
        if self.num_classes and self.class_names and set(self.class_names) != set(range(1, self.num_classes)):
            raise ConfigError(f"SegmenterConfig.class_names must name classes 1..{self.num_classes - 1}, got "
                              f"{sorted(self.class_names)}")

    @property
    def has_types(self) -> bool:
        return self.num_classes >= 2

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"] = list(self.channels)
        out["class_names"] = {str(k): v for k, v in sorted(self.class_names.items())}
        return {"model_type": _MODEL_TYPE, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str = "config") -> SegmenterConfig:
        data = dict(data)
        if data.pop("model_type", None) != _MODEL_TYPE:
            raise WeightsError(f"{where}: not a diffaug segmenter config (model_type must be {_MODEL_TYPE!r})")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise WeightsError(f"{where}: unknown config keys {sorted(unknown)}; was it written by a newer diffaug?")
        return cls(**data)


@dataclass
class SegmenterOutput:
    """Raw per-pixel outputs, (B, C, H, W) each. ``tp`` is None for an instance-only model."""

    np: torch.Tensor
    hv: torch.Tensor
    tp: torch.Tensor | None


def _groups(ch: int) -> int:
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True),
        )


class _Decoder(nn.Module):
    """UNet decoder: from the deepest feature up to full resolution, with one 1×1 head of ``out_channels``."""

    def __init__(self, channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        rev = channels[::-1]
        self.blocks = nn.ModuleList(_DoubleConv(rev[i] + rev[i + 1], rev[i + 1]) for i in range(len(rev) - 1))
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, feats[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class Segmenter(nn.Module):
    """HoVer-Net-style three-branch UNet (see the module docstring).

    Example:
        >>> import torch
        >>> model = Segmenter(SegmenterConfig(num_classes=5, channels=(8, 16)), generator=torch.Generator().manual_seed(0))
        >>> out = model(torch.rand(1, 3, 32, 32))
        >>> tuple(out.np.shape), tuple(out.hv.shape), tuple(out.tp.shape)
        ((1, 2, 32, 32), (1, 2, 32, 32), (1, 5, 32, 32))
    """

    def __init__(self, config: SegmenterConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        self.encoder = nn.ModuleList(_DoubleConv(config.in_channels if i == 0 else ch[i - 1], ch[i])
                                     for i in range(len(ch)))
        self.np_decoder = _Decoder(ch, 2)
        self.hv_decoder = _Decoder(ch, 2)
        self.tp_decoder = _Decoder(ch, config.num_classes) if config.has_types else None
        if generator is not None:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-initialise every weight from ``generator`` (Kaiming-uniform convs, zero biases, unit norms).

        Initialisation is drawn from the injected generator, never from torch's global state, so a seed gives the same
        model wherever it is built.
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_uniform_(module.weight, a=0.0, nonlinearity="relu", generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.GroupNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        """``x``: float (B, 3, H, W) in [0, 1], H and W multiples of ``config.size_multiple``."""
        m = self.config.size_multiple
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"Segmenter input must be (B, {self.config.in_channels}, H, W) with H, W multiples of "
                             f"{m}; got {tuple(x.shape)}")
        feats = []
        h = x * 2.0 - 1.0
        for i, block in enumerate(self.encoder):
            if i:
                h = F.max_pool2d(h, 2)
            h = block(h)
            feats.append(h)
        return SegmenterOutput(np=self.np_decoder(feats), hv=self.hv_decoder(feats),
                               tp=None if self.tp_decoder is None else self.tp_decoder(feats))

    # -- checkpoint ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (float32) into the folder ``path``."""
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(path / WEIGHTS_NAME, save(state, metadata={"format": "pt", "model_type": _MODEL_TYPE}))
        atomic_write_json(path / CONFIG_NAME, self.config.to_json())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Segmenter:
        """Load a folder written by :meth:`save_pretrained`. Loading is strict: a missing or extra weight is an error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights_path.is_file():
            raise WeightsError(f"{path}: not a segmenter checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME}); train "
                               "one with `diffaug evaluate ...` or Segmenter.save_pretrained")
        try:
            data = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightsError(f"{cfg_path}: not valid JSON ({exc})") from None
        try:
            config = SegmenterConfig.from_json(data, where=str(cfg_path))
        except (TypeError, ConfigError) as exc:
            raise WeightsError(f"{cfg_path}: invalid segmenter config ({exc})") from None
        model = cls(config)
        try:
            state = load_file(weights_path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{weights_path}: unreadable safetensors file ({exc})") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{weights_path}: weights do not match {cfg_path}: {exc}") from None
        return model.to(device).eval()
