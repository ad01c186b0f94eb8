"""SemanticUNet: the semantic diffusion model (SDM) of DiffMix, written fresh in one file.

The network is guided-diffusion's ADM UNet with SDM's change (Wang et al., 2022, "Semantic Image Synthesis via
Diffusion Models"; SPEC §2): the encoder never sees the label map, and every ResBlock of the middle block and of the
decoder normalises with SPADE (Park et al., 2019), whose scale and shift are convolutions of the label map ``y``.

Layout, with ``C = model_channels`` and ``E = 4C`` the width of the time embedding:

- ``time_embed``: sinusoidal(t, C) -> Linear(C, E) -> SiLU -> Linear(E, E).
- ``input_blocks`` (encoder): a 3x3 conv, then per level ``num_res_blocks`` :class:`ResBlock` (GroupNorm(32)) with
  :class:`AttentionBlock` where the feature size is in ``attention_resolutions``, and a downsampling ResBlock
  between levels (average pooling on both paths).
- ``middle_block``: :class:`SDMResBlock`, :class:`AttentionBlock`, :class:`SDMResBlock`.
- ``output_blocks`` (decoder): per level ``num_res_blocks + 1`` :class:`SDMResBlock` fed with the concatenated
  encoder skip, attention as in the encoder, and an upsampling SDMResBlock (nearest x2) between levels.
- ``out``: GroupNorm(32) -> SiLU -> conv3x3 to ``2 * in_channels`` channels: ε, then the variance interpolation v
  of Improved DDPM (the diffusion module turns v into log σ², see :mod:`diffaug.diffusion`).

Every ResBlock applies the time embedding as FiLM after its second normalisation (``use_scale_shift_norm``):
``h = norm(h) * (1 + scale) + shift`` with ``(scale, shift)`` the two halves of ``emb_layers(emb)``.

Parameter names equal the original SDM/DiffMix ``state_dict`` keys (``input_blocks.1.0.in_layers.2.weight``, ...),
so an original checkpoint loads with a strict ``load_state_dict`` and no renaming (see
:mod:`diffaug.models.convert`). That is why a few containers are ``nn.Sequential`` holding parameter-free SiLU and
Dropout modules: they keep the original indices.

**Fast path for sampling** (SPEC §4). The label map is fixed while an image is sampled, and only SPADE sees it, so:

- :meth:`SemanticUNet.precompute_condition` computes every SPADE layer's (γ, β) once per sample, as a
  :class:`SemanticCondition` that :meth:`SemanticUNet.forward` and :meth:`SemanticUNet.decode` accept instead of
  ``y``;
- :meth:`SemanticUNet.encode` and :meth:`SemanticUNet.decode` split the network where the label enters, so the
  conditional and the null branch of classifier-free guidance can share one encoder pass.

The null condition of guidance is ``y`` all zeros; its (γ, β) are those of a zero input (the convolution biases),
not zero: build it with ``precompute_condition(torch.zeros_like(y))``.

Memory: a :class:`SemanticCondition` holds two tensors (γ, β) per SPADE layer (50 in DiffMix's model) at that
layer's feature size and width. Per image, that is ``SemanticUNet.condition_numel(H, W)`` numbers: 5.10e8 for
DiffMix's 256-px model, i.e. 0.95 GiB in bfloat16 and 1.90 GiB in float32, and 3.93e6 (15 MiB in float32) for the
64-px fixture model. Guidance doubles it (conditional and null; the null condition of batch 1 can be shared with
:meth:`SemanticCondition.expand`). The encoder state kept for the shared pass (the skips) is much smaller: 7.1e7
numbers per 256-px image.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffaug.errors import ConfigError, InvalidInputError, WeightsError

__all__ = [
    "SemanticUNetConfig",
    "SemanticUNet",
    "SemanticCondition",
    "ResBlock",
    "SDMResBlock",
    "SPADEGroupNorm",
    "AttentionBlock",
    "timestep_embedding",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

#: GroupNorm groups, fixed at 32 in the original (``normalization()`` and SPADE's GroupNorm).
GROUPS = 32
#: GroupNorm epsilon (PyTorch's default, used by the original).
GN_EPS = 1e-5

_DEFAULT_DIFFUSION: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "linear"}


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SemanticUNetConfig:
    """Architecture of a :class:`SemanticUNet`, plus the metadata its ``config.json`` carries.

    Names follow the original SDM flags where they exist (``num_channels`` is ``model_channels`` here, as in the
    original ``UNetModel``). Invalid values raise :class:`~diffaug.errors.ConfigError` at construction.

    Args:
        image_size: Training image size in pixels. Attention placement is derived from it, and it must be divisible
            by ``2 ** (len(channel_mult) - 1)``.
        model_channels: Base width C. Every level's width ``C * mult`` must be divisible by 32 (GroupNorm groups).
        channel_mult: Width multiplier per level; the number of levels is the UNet depth.
        num_classes: Classes of the type map, background (0) included: the one-hot part of ``y``.
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        attention_resolutions: Feature sizes (in pixels, for ``image_size`` inputs) that get self-attention, e.g.
            ``(32, 16, 8)``. The middle block always has attention.
        num_head_channels: Channels per attention head; ``-1`` to use a fixed ``num_heads`` instead.
        num_heads: Heads per attention block when ``num_head_channels == -1``.
        num_heads_upsample: Heads in the decoder when ``num_head_channels == -1``; ``-1`` means ``num_heads``.
        instance_edges: Whether ``y`` ends with the instance edge channel (SDM's ``no_instance=False``).
        dropout: Dropout before the last conv of every ResBlock (training only).
        spade_hidden: Width of SPADE's shared conv (128 in the original).
        in_channels: Image channels; the output has ``2 * in_channels`` (ε and v).
        class_scheme: Optional name of the class scheme of the type maps the model was trained on
            (:data:`diffaug.data.schemes.SCHEMES`), so pipelines can check a type map's classes.
        class_names: Optional names of the ``num_classes`` classes, background first.
        mpp: Optional µm per pixel of the training images (metadata: generation records it beside the data's).
        diffusion: Diffusion settings the model was trained with, consumed by :mod:`diffaug.diffusion`. The model
            itself reads only ``num_train_timesteps``, to validate timesteps.
    """

    image_size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_classes: int
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    num_heads: int = 4
    num_heads_upsample: int = -1
    instance_edges: bool = True
    dropout: float = 0.0
    spade_hidden: int = 128
    in_channels: int = 3
    class_scheme: str | None = None
    class_names: tuple[str, ...] | None = None
    mpp: float | None = None
    diffusion: Mapping[str, Any] = field(default_factory=lambda: dict(_DEFAULT_DIFFUSION))

    def __post_init__(self) -> None:
        # Lists (from JSON) become tuples so the config is comparable and immutable.
        for name in ("channel_mult", "attention_resolutions", "class_names"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.diffusion, Mapping):
            object.__setattr__(self, "diffusion", dict(self.diffusion))
        self._validate()

    # -- derived quantities --------------------------------------------------------------------------------------------

    @property
    def label_nc(self) -> int:
        """Channels of the condition ``y``: one-hot classes, then the instance edge map if ``instance_edges``."""
        return self.num_classes + int(self.instance_edges)

    @property
    def out_channels(self) -> int:
        """Output channels: ε and the variance interpolation v, ``in_channels`` each."""
        return 2 * self.in_channels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def size_divisor(self) -> int:
        """Image sides must be multiples of this: the total downsampling of the encoder."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_downsample_rates(self) -> tuple[int, ...]:
        """The downsampling factors at which attention sits (the original's ``attention_ds``)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.diffusion["num_train_timesteps"])

    def heads(self, channels: int, *, decoder: bool = False) -> int:
        """Number of attention heads of a block with ``channels`` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if decoder and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    # -- validation ------------------------------------------------------------------------------------------------

    def _validate(self) -> None:
        def need_int(name: str, minimum: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"model config: {name} must be an integer >= {minimum}, got {value!r}")
            return value

        need_int("image_size", 1)
        need_int("model_channels", 1)
        need_int("num_classes", 1)
        need_int("num_res_blocks", 1)
        need_int("spade_hidden", 1)
        need_int("in_channels", 1)
        for name in ("num_head_channels", "num_heads", "num_heads_upsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ConfigError(f"model config: {name} must be a positive integer or -1, got {value!r}")
        if self.num_head_channels == -1 and self.num_heads == -1:
            raise ConfigError("model config: set num_head_channels or num_heads (both are -1)")
        if not isinstance(self.instance_edges, bool):
            raise ConfigError(f"model config: instance_edges must be true or false, got {self.instance_edges!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            valid = isinstance(value, tuple) and all(not isinstance(v, bool) and isinstance(v, int) and v >= 1
                                                     for v in value)
            if not valid or (name == "channel_mult" and not value):
                raise ConfigError(f"model config: {name} must be a list of positive integers, got {value!r}")

        widths = [self.model_channels * m for m in self.channel_mult]
        bad = [w for w in widths if w % GROUPS]
        if bad:
            raise ConfigError(f"model config: every level width model_channels * channel_mult must be divisible by "
                              f"{GROUPS} (GroupNorm groups); {self.model_channels} * {list(self.channel_mult)} gives "
                              f"{widths}")
        if self.image_size % self.size_divisor:
            raise ConfigError(f"model config: image_size {self.image_size} cannot be divided by the depth of the UNet: "
                              f"{self.num_levels} levels downsample by {self.size_divisor}, so image_size must be a "
                              f"multiple of {self.size_divisor}")
        sizes = [self.image_size // 2**level for level in range(self.num_levels)]
        unreached = [r for r in self.attention_resolutions if r not in sizes]
        if unreached:
            raise ConfigError(f"model config: attention_resolutions {unreached} are not feature sizes of this model "
                              f"(image_size {self.image_size} with {self.num_levels} levels has feature sizes {sizes})")
        attn_widths = {self.model_channels * m for level, m in enumerate(self.channel_mult)
                       if sizes[level] in self.attention_resolutions} | {widths[-1]}  # middle block: always
        if self.num_head_channels != -1:
            bad = sorted(w for w in attn_widths if w % self.num_head_channels)
            if bad:
                raise ConfigError(f"model config: attention widths {bad} are not divisible by num_head_channels "
                                  f"{self.num_head_channels}")
        else:
            heads = {self.num_heads, self.num_heads_upsample if self.num_heads_upsample != -1 else self.num_heads}
            bad = sorted(w for w in attn_widths for n in heads if w % n)
            if bad:
                raise ConfigError(f"model config: attention widths {bad} are not divisible by the number of heads "
                                  f"{sorted(heads)}")

        if self.class_scheme is not None:
            if not isinstance(self.class_scheme, str) or not self.class_scheme:
                raise ConfigError(f"model config: class_scheme must be a scheme name, got {self.class_scheme!r}")
            from diffaug.data.schemes import SCHEMES

            scheme = SCHEMES.get(self.class_scheme)
            if scheme is not None and scheme.num_classes != self.num_classes:
                raise ConfigError(f"model config: class_scheme {self.class_scheme!r} has {scheme.num_classes} classes "
                                  f"counting background, but num_classes is {self.num_classes}")
        if self.class_names is not None:
            if (not isinstance(self.class_names, tuple) or len(self.class_names) != self.num_classes
                    or not all(isinstance(n, str) for n in self.class_names)):
                raise ConfigError(f"model config: class_names must list {self.num_classes} names (background first), "
                                  f"got {self.class_names!r}")
        if self.mpp is not None and (isinstance(self.mpp, bool) or not isinstance(self.mpp, (int, float))
                                     or not self.mpp > 0):
            raise ConfigError(f"model config: mpp must be a positive number of µm per pixel, got {self.mpp!r}")

        if not isinstance(self.diffusion, dict):
            raise ConfigError(f"model config: diffusion must be a mapping, got {self.diffusion!r}")
        steps = self.diffusion.get("num_train_timesteps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"model config: diffusion.num_train_timesteps must be a positive integer, got {steps!r}")

    # -- (de)serialisation -------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content: every field (tuples as lists), ``_class_name`` and ``_diffaug_version``."""
        from diffaug import __version__

        out: dict[str, Any] = {"_class_name": SemanticUNet.__name__, "_diffaug_version": __version__}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model config") -> SemanticUNetConfig:
        """Build a config from a ``config.json`` mapping. Strict: an unknown or missing key is a ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        class_name = data.pop("_class_name", SemanticUNet.__name__)
        data.pop("_diffaug_version", None)
        if class_name != SemanticUNet.__name__:
            raise ConfigError(f"{source}: _class_name is {class_name!r}, but this loader builds "
                              f"{SemanticUNet.__name__!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; a SemanticUNet config has exactly: "
                              f"{sorted(known)} (plus _class_name and _diffaug_version). If this is an original "
                              f"SDM/DiffMix flags file, convert the checkpoint with `diffaug convert --from-sdm`.")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and _is_required(f))
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - guarded by the key checks above
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> SemanticUNetConfig:
        return cls.from_dict(read_json(path, "model config", WeightsError), source=str(path))

    @classmethod
    def diffmix_256(cls, num_classes: int, **overrides: Any) -> SemanticUNetConfig:
        """DiffMix's 256-px architecture (SPEC §2): C=256, 2 res blocks, mult (1,1,2,2,4,4), attention 32/16/8 with
        64 channels per head; 652 M parameters at ``num_classes=5``."""
        base: dict[str, Any] = dict(image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4),
                                    num_classes=num_classes, num_res_blocks=2, attention_resolutions=(32, 16, 8),
                                    num_head_channels=64)
        base.update(overrides)
        return cls(**base)


def read_json(path: str | os.PathLike[str], what: str, missing_error: type[Exception]) -> Any:
    """Parse a JSON file; a missing file raises ``missing_error``, invalid JSON a :class:`ConfigError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise missing_error(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc


def _is_required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (original, integer) timesteps, computed in float32.

    ``emb = [cos(t·f_i), sin(t·f_i)]`` with ``f_i = exp(-ln(max_period)·i/half)``, ``i = 0..half-1`` (Transformer
    positional encoding as used by ADM); an odd ``dim`` is padded with one zero.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 whatever the input dtype, like the original ``GroupNorm32``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters (the last conv of each residual branch, as in ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@dataclass(frozen=True)
class SemanticCondition:
    """SPADE's (γ, β) for every SPADE layer of a model, computed once from a batch of label maps ``y``.

    Built by :meth:`SemanticUNet.precompute_condition`; accepted by :meth:`SemanticUNet.forward` (``cond=``) and
    :meth:`SemanticUNet.decode` instead of ``y``. Only valid for the model (and weights) that built it.

    Attributes:
        modulation: SPADE layer name -> (γ, β), each (B, C_layer, H_layer, W_layer).
        batch_size: B.
        size: (H, W) of the label maps, i.e. of the images they condition.
    """

    modulation: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    batch_size: int
    size: tuple[int, int]

    @staticmethod
    def cat(conditions: Sequence[SemanticCondition]) -> SemanticCondition:
        """Concatenate conditions along the batch, e.g. ``cat([cond, null])`` for batched guidance (batch 2B)."""
        if not conditions:
            raise InvalidInputError("SemanticCondition.cat needs at least one condition")
        first = conditions[0]
        for c in conditions[1:]:
            if c.size != first.size or c.modulation.keys() != first.modulation.keys():
                raise InvalidInputError(f"cannot concatenate conditions of different models or sizes "
                                        f"({first.size} and {c.size})")
        modulation = {key: (torch.cat([c.modulation[key][0] for c in conditions]),
                            torch.cat([c.modulation[key][1] for c in conditions]))
                      for key in first.modulation}
        return SemanticCondition(modulation, sum(c.batch_size for c in conditions), first.size)

    def expand(self, batch_size: int) -> SemanticCondition:
        """Broadcast a batch-1 condition (e.g. the null condition) to ``batch_size`` without copying memory."""
        if self.batch_size != 1:
            raise InvalidInputError(f"only a condition of batch size 1 can be expanded, this one has {self.batch_size}")
        modulation = {k: (g.expand(batch_size, -1, -1, -1), b.expand(batch_size, -1, -1, -1))
                      for k, (g, b) in self.modulation.items()}
        return SemanticCondition(modulation, batch_size, self.size)

    def to(self, *args: Any, **kwargs: Any) -> SemanticCondition:
        """Move or cast every tensor, with :meth:`torch.Tensor.to` arguments."""
        modulation = {k: (g.to(*args, **kwargs), b.to(*args, **kwargs)) for k, (g, b) in self.modulation.items()}
        return SemanticCondition(modulation, self.batch_size, self.size)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached tensors (an expanded condition reports its logical size)."""
        return sum(g.numel() * g.element_size() + b.numel() * b.element_size() for g, b in self.modulation.values())


#: What the decoder accepts as the condition: the label maps ``y`` (SPADE computed on the fly) or a cached condition.
Condition = torch.Tensor | SemanticCondition


class SPADEGroupNorm(nn.Module):
    """SPADE with GroupNorm: ``GN(x)·(1 + γ(y)) + β(y)``, GN with 32 groups and no affine parameters.

    γ and β are 3x3 convs of a shared conv3x3(label_nc -> hidden) + ReLU of ``y`` resized to the feature size with
    nearest interpolation (Park et al. 2019, Eq. 1; SDM applies it to GroupNorm).

    Args:
        channels: Channels of the normalised features.
        label_nc: Channels of ``y``.
        hidden: Width of the shared conv.
        downsample: How much smaller than the image the features are (so (γ, β) can be precomputed).
    """

    def __init__(self, channels: int, label_nc: int, hidden: int, downsample: int) -> None:
        super().__init__()
        self.channels = channels
        self.downsample = downsample
        #: Name of this layer inside its model; set by :class:`SemanticUNet`, the key of a :class:`SemanticCondition`.
        self.key = ""
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def modulation(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β) of label maps ``y`` (B, label_nc, H, W) at this layer's feature size."""
        size = (y.shape[-2] // self.downsample, y.shape[-1] // self.downsample)
        if self.downsample != 1:
            # "nearest" (not "nearest-exact"): at x2 this takes the even pixels, as the original does.
            y = F.interpolate(y, size=size, mode="nearest")
        actv = self.mlp_shared(y)
        return self.mlp_gamma(actv), self.mlp_beta(actv)

    def forward(self, x: torch.Tensor, cond: Condition) -> torch.Tensor:
        normalized = F.group_norm(x.float(), GROUPS, eps=GN_EPS).to(x.dtype)
        if isinstance(cond, SemanticCondition):
            gamma, beta = cond.modulation[self.key]
        else:
            gamma, beta = self.modulation(cond)
        return normalized * (1 + gamma) + beta


class ResBlock(nn.Module):
    """Encoder ResBlock (ADM): GroupNorm(32) normalisation, scale-shift time FiLM, optional average-pool downsampling.

    ``h = conv(SiLU(GN(x)))`` (pooled before the conv when ``down``), ``h = GN(h)·(1+scale)+shift``,
    ``h = conv(dropout(SiLU(h)))``, output ``skip(x) + h``.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, *,
                 down: bool = False) -> None:
        super().__init__()
        self.down = down
        self.in_layers = nn.Sequential(GroupNorm32(GROUPS, channels, eps=GN_EPS), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(GROUPS, out_channels, eps=GN_EPS), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = conv(h)
        scale, shift = self.emb_layers(emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        out_norm, *out_rest = self.out_layers
        h = out_norm(h) * (1 + scale) + shift
        for layer in out_rest:
            h = layer(h)
        return self.skip_connection(x) + h


class SDMResBlock(nn.Module):
    """Decoder/middle ResBlock of SDM: both normalisations are SPADE, optional nearest x2 upsampling.

    ``h = conv(SiLU(SPADE_in(x, y)))`` (upsampled before the conv when ``up``),
    ``h = SPADE_out(h, y)·(1+scale)+shift``, ``h = conv(dropout(SiLU(h)))``, output ``skip(x) + h``.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, *, label_nc: int,
                 spade_hidden: int, downsample: int, up: bool = False) -> None:
        super().__init__()
        self.up = up
        self.in_norm = SPADEGroupNorm(channels, label_nc, spade_hidden, downsample)
        self.in_layers = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = SPADEGroupNorm(out_channels, label_nc, spade_hidden, downsample // 2 if up else downsample)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: Condition) -> torch.Tensor:
        act, conv = self.in_layers
        h = act(self.in_norm(x, cond))
        if self.up:
            h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
        h = conv(h)
        scale, shift = self.emb_layers(emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_norm(h, cond) * (1 + scale) + shift
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions, with the original ("legacy") QKV layout.

    ``qkv`` (B, 3C, T) is split into heads *before* q/k/v: reshaped to (B·heads, 3·C/heads, T), then split into q, k,
    v of C/heads channels each. Scores are ``softmax(qᵀk / sqrt(C/heads))``; the original applies the scale as
    ``(C/heads)^(-1/4)`` to q and k each, which is the same quantity. The original takes the softmax in float32;
    ``scaled_dot_product_attention`` does too in its fused kernels (flash / memory-efficient), including under bf16
    autocast.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(GROUPS, channels, eps=GN_EPS)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(flat))
        head_ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * head_ch, height * width).split(head_ch, dim=1)
        # (B·heads, T, ch): scaled_dot_product_attention's default scale is 1/sqrt(ch), as in the original.
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = attn.transpose(1, 2).reshape(b, c, height * width)
        return (flat + self.proj_out(h)).reshape(b, c, height, width)


class _Stage(nn.Sequential):
    """One entry of ``input_blocks``/``output_blocks``/``middle_block``: layers applied in order, each given what it
    needs (the original ``TimestepEmbedSequential``)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cond: Condition | None = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, SDMResBlock):
                if cond is None:
                    raise InvalidInputError("the middle block and the decoder need a condition (y or cond)")
                h = layer(h, emb, cond)
            elif isinstance(layer, ResBlock):
                h = layer(h, emb)
            else:
                h = layer(h)
        return h


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


class SemanticUNet(nn.Module):
    """The SDM/DiffMix semantic diffusion UNet (see the module docstring for the architecture).

    ``model(x, timesteps, y)`` returns (B, 2·in_channels, H, W): ε, then the variance interpolation v.

    Args:
        config: The architecture.

    Example:
        >>> import torch
        >>> from diffaug.models import SemanticUNet, SemanticUNetConfig
        >>> config = SemanticUNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2), num_classes=3,
        ...                             num_res_blocks=1, attention_resolutions=(16,), num_head_channels=32,
        ...                             spade_hidden=16)
        >>> model = SemanticUNet(config).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> y = torch.zeros(2, config.label_nc, 32, 32)
        >>> model(x, torch.tensor([0, 999]), y).shape
        torch.Size([2, 6, 32, 32])
    """

    def __init__(self, config: SemanticUNetConfig) -> None:
        super().__init__()
        if not isinstance(config, SemanticUNetConfig):
            raise ConfigError(f"SemanticUNet needs a SemanticUNetConfig, got {type(config).__name__}")
        self.config = config
        c = config.model_channels
        emb_dim = config.time_embed_dim
        attn_ds = set(config.attention_downsample_rates)
        spade = dict(label_nc=config.label_nc, spade_hidden=config.spade_hidden)

        self.time_embed = nn.Sequential(nn.Linear(c, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = c * config.channel_mult[0]
        self.input_blocks = nn.ModuleList([_Stage(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, c * mult, config.dropout)]
                ch = c * mult
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, config.heads(ch)))
                self.input_blocks.append(_Stage(*layers))
                skip_channels.append(ch)
            if level != config.num_levels - 1:
                self.input_blocks.append(_Stage(ResBlock(ch, emb_dim, ch, config.dropout, down=True)))
                ds *= 2
                skip_channels.append(ch)

        self.middle_block = _Stage(
            SDMResBlock(ch, emb_dim, ch, config.dropout, downsample=ds, **spade),
            AttentionBlock(ch, config.heads(ch)),
            SDMResBlock(ch, emb_dim, ch, config.dropout, downsample=ds, **spade),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                skip = skip_channels.pop()
                layers = [SDMResBlock(ch + skip, emb_dim, c * mult, config.dropout, downsample=ds, **spade)]
                ch = c * mult
                if ds in attn_ds:
                    layers.append(AttentionBlock(ch, config.heads(ch, decoder=True)))
                if level and i == config.num_res_blocks:
                    layers.append(SDMResBlock(ch, emb_dim, ch, config.dropout, downsample=ds, up=True, **spade))
                    ds //= 2
                self.output_blocks.append(_Stage(*layers))

        self.out = nn.Sequential(GroupNorm32(GROUPS, ch, eps=GN_EPS), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, config.out_channels, 3, padding=1)))

        self._spades: list[SPADEGroupNorm] = []
        for name, module in self.named_modules():
            if isinstance(module, SPADEGroupNorm):
                module.key = name
                self._spades.append(module)

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def condition_numel(self, height: int, width: int) -> int:
        """Numbers a :class:`SemanticCondition` holds per image of size (height, width) (memory = this x dtype size)."""
        return sum(2 * s.channels * (height // s.downsample) * (width // s.downsample) for s in self._spades)

    # -- input validation ----------------------------------------------------------------------------------------------

    def _check_x(self, x: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != cfg.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidInputError(f"x must be a tensor (B, {cfg.in_channels}, H, W), got {shape}")
        if not x.is_floating_point():
            raise InvalidInputError(f"x must be a floating-point image scaled to [-1, 1], got dtype {x.dtype}")
        h, w = x.shape[-2:]
        if h % cfg.size_divisor or w % cfg.size_divisor or h == 0 or w == 0:
            raise InvalidInputError(f"x has size {h}x{w}, but this model's {cfg.num_levels} levels need sides that are "
                                    f"positive multiples of {cfg.size_divisor}")

    def _check_timesteps(self, timesteps: torch.Tensor, batch: int) -> None:
        if not isinstance(timesteps, torch.Tensor) or timesteps.shape != (batch,):
            shape = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
            raise InvalidInputError(f"timesteps must be a tensor of shape ({batch},), one per image, got {shape}")
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise InvalidInputError(f"timesteps must be integer original indices, got dtype {timesteps.dtype}")
        if torch.compiler.is_compiling() or batch == 0 or timesteps.device.type == "meta":
            return
        steps = self.config.num_train_timesteps
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < 0 or hi >= steps:
            raise InvalidInputError(f"timesteps must be original indices in 0..{steps - 1}, got values from {lo} to "
                                    f"{hi}; pass the original index, not the respaced one")

    def _check_condition(self, cond: Condition, batch: int, size: tuple[int, int]) -> None:
        if isinstance(cond, SemanticCondition):
            if cond.batch_size != batch or cond.size != size:
                raise InvalidInputError(f"cond was computed for {cond.batch_size} label maps of size {cond.size}, but "
                                        f"the input has {batch} images of size {size}")
            if cond.modulation.keys() != {s.key for s in self._spades}:
                raise InvalidInputError("cond was computed by a model of another architecture")
            return
        cfg = self.config
        if not isinstance(cond, torch.Tensor) or cond.ndim != 4:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise InvalidInputError(f"y must be a tensor (B, {cfg.label_nc}, H, W), got {shape}")
        if cond.shape[1] != cfg.label_nc:
            layout = f"{cfg.num_classes} one-hot classes" + (" + 1 instance edge map" if cfg.instance_edges else "")
            raise InvalidInputError(f"y has {cond.shape[1]} channels, but this model takes label_nc={cfg.label_nc} "
                                    f"({layout})")
        if cond.shape[0] != batch or tuple(cond.shape[-2:]) != size:
            raise InvalidInputError(f"y has shape {tuple(cond.shape)}, but x has {batch} images of size {size}; y must "
                                    f"be the label maps of x at the same size")

    # -- forward -----------------------------------------------------------------------------------------------------

    def precompute_condition(self, y: torch.Tensor) -> SemanticCondition:
        """SPADE's (γ, β) of every SPADE layer for label maps ``y`` (B, label_nc, H, W), computed once.

        Pass the result as ``cond=`` to :meth:`forward` or to :meth:`decode`, which then skip SPADE's convolutions of
        ``y`` (about 35 % of the FLOPs of DiffMix's model). Memory: ``condition_numel(H, W)`` numbers per image (see
        the module docstring). For the null condition of guidance, pass ``torch.zeros_like(y)`` (its γ/β are those of
        a zero input, not zero); with batch 1 it can be shared with :meth:`SemanticCondition.expand`.
        """
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InvalidInputError(f"y must be a tensor (B, {self.config.label_nc}, H, W), got {shape}")
        self._check_condition(y, y.shape[0], (y.shape[-2], y.shape[-1]))
        h, w = y.shape[-2:]
        if h % self.config.size_divisor or w % self.config.size_divisor:
            raise InvalidInputError(f"y has size {h}x{w}; sides must be multiples of {self.config.size_divisor}")
        y = y.to(self.dtype)
        modulation = {s.key: s.modulation(y) for s in self._spades}
        return SemanticCondition(modulation, y.shape[0], (h, w))

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Run the label-free part: the time embedding and the encoder.

        Args:
            x: Noisy images (B, in_channels, H, W) in the model's scale.
            timesteps: Original timestep indices (B,), integers in ``0..num_train_timesteps-1``.

        Returns:
            ``(h, skips, emb)``: the deepest features, every encoder output in order (what the decoder concatenates;
            the last one is ``h``), and the time embedding (B, 4C). To share one encoder pass between the two
            branches of guidance, concatenate each with itself along the batch and :meth:`decode` with a 2B
            condition.
        """
        self._check_x(x)
        self._check_timesteps(timesteps, x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(self.dtype))
        h = x.to(self.dtype)
        skips = []
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        return h, skips, emb

    def decode(self, h: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor,
               cond: Condition) -> torch.Tensor:
        """Run the label-dependent part: middle block, decoder and output head.

        Args:
            h, skips, emb: What :meth:`encode` returned (possibly concatenated along the batch).
            cond: Label maps ``y`` (B, label_nc, H, W), or their :class:`SemanticCondition`.

        Returns:
            (B, 2·in_channels, H, W): ε, then v.
        """
        if len(skips) != len(self.input_blocks):
            raise InvalidInputError(f"skips has {len(skips)} tensors, but the encoder makes {len(self.input_blocks)}")
        if h.shape[0] != emb.shape[0] or any(s.shape[0] != h.shape[0] for s in skips):
            raise InvalidInputError("h, skips and emb must have the same batch size")
        self._check_condition(cond, h.shape[0], tuple(skips[0].shape[-2:]))
        if isinstance(cond, torch.Tensor):
            cond = cond.to(self.dtype)
        h = self.middle_block(h, emb, cond)
        for stage, skip in zip(self.output_blocks, reversed(skips)):
            h = stage(torch.cat([h, skip], dim=1), emb, cond)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None, *,
                cond: SemanticCondition | None = None) -> torch.Tensor:
        """Predict ε and v.

        Args:
            x: Noisy images (B, in_channels, H, W), H and W multiples of ``config.size_divisor``.
            timesteps: Original timestep indices (B,), integers in ``0..num_train_timesteps-1``.
            y: Label maps (B, label_nc, H, W): one-hot classes (background is channel 0), then the instance edge map;
                all zeros is the null condition of classifier-free guidance.
            cond: Instead of ``y``, its :meth:`precompute_condition` (the same result, SPADE's convs skipped).

        Returns:
            (B, 2·in_channels, H, W): ε in channels ``[0, in_channels)``, v in the rest.
        """
        if (y is None) == (cond is None):
            raise InvalidInputError("pass exactly one of y (label maps) or cond (a SemanticCondition)")
        self._check_x(x)
        self._check_condition(y if y is not None else cond, x.shape[0], tuple(x.shape[-2:]))  # type: ignore[arg-type]
        h, skips, emb = self.encode(x, timesteps)
        return self.decode(h, skips, emb, y if y is not None else cond)  # type: ignore[arg-type]

    # -- persistence -------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike[str], *,
                        metadata: Mapping[str, str] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (tensors in their current dtype) to a folder.

        Both files are written atomically. ``metadata`` (strings) goes into the safetensors header, e.g. provenance.
        Returns the folder.
        """
        from safetensors.torch import save_file

        from diffaug._io import atomic_write_json

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
        try:
            header = {"format": "pt", "diffaug_class": type(self).__name__, **(metadata or {})}
            save_file(state, str(tmp), metadata=header)
            os.replace(tmp, out / WEIGHTS_NAME)
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write_json(out / CONFIG_NAME, self.config.to_dict())
        return out

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike[str], revision: str | None = None, *,
                        cache_dir: str | os.PathLike[str] | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> SemanticUNet:
        """Load a model strictly from a folder, a Hugging Face Hub repo id, or a registered name.

        Args:
            path_or_repo_id: A folder with ``config.json`` + ``model.safetensors``, a Hub repo id (``org/name``) in
                that layout, or a name of :data:`diffaug.hub.REGISTRY` (converted from the original on first use).
            revision: Hub branch, tag or commit sha (default: the registered revision, else ``main``).
            cache_dir: Hugging Face cache folder (default: huggingface_hub's, i.e. ``$HF_HUB_CACHE``).
            device: Where to put the weights (default CPU).
            dtype: Cast floating-point weights to this dtype (default: as stored).

        Returns:
            The model in eval mode.

        Raises:
            WeightsError: The files cannot be found or read, or a key is missing or unexpected, or a shape differs
                from what the config builds.
            ConfigError: ``config.json`` is invalid or has an unknown key.
        """
        from diffaug.hub import resolve_pretrained

        folder = resolve_pretrained(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        config = SemanticUNetConfig.from_json_file(folder / CONFIG_NAME)
        state = load_safetensors(folder / WEIGHTS_NAME, device=device)
        return cls.from_state_dict(config, state, source=str(folder / WEIGHTS_NAME), dtype=dtype)

    @classmethod
    def from_state_dict(cls, config: SemanticUNetConfig, state_dict: Mapping[str, torch.Tensor], *,
                        source: str = "state dict", dtype: torch.dtype | None = None) -> SemanticUNet:
        """Build a model for ``config`` holding exactly ``state_dict`` (strict; no random initialisation is run)."""
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model, state_dict, source=source)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Weights IO
# ----------------------------------------------------------------------------------------------------------------------


def load_safetensors(path: str | os.PathLike[str], *, device: torch.device | str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, turning a missing or unreadable file into a :class:`WeightsError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc}); download or convert it again") from exc


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                     hint: str = "") -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` has exactly the model's keys with the model's shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: weights {tuple(state_dict[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not (missing or unexpected or mismatched or not_tensors):
        return

    def listing(items: Iterable[str], limit: int = 5) -> str:
        items = list(items)
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return "; ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {listing(mismatched)}")
    if not_tensors:
        parts.append(f"non-tensor entries: {listing(not_tensors)}")
    raise WeightsError(f"{source}: the weights do not match the model config ({'; '.join(parts)}). "
                       f"{hint or 'Check that config.json belongs to these weights.'}")
