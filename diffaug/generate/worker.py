"""The work of one batch of a generation job, shared by every engine.

For each item of a batch: crop its window from the source tile, edit the window's label maps with the item's own
numpy generator (:func:`edit_window`), draw its start noise from the item's own torch generator; then synthesise the
whole batch in one pipeline call with that noise passed as ``noise=``, and write each item's files, its record last.
Everything an item's bytes depend on is therefore fixed by the job and the item's index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffaug.errors import InvalidInputError
from diffaug.generate.job import Layout
from diffaug.generate.plan import Item, item_generators, item_seed, plan_items
from diffaug.generate.weights import WeightsInfo

if TYPE_CHECKING:
    import torch

    from diffaug.data.schemes import ClassScheme
    from diffaug.data.tiles import Tile
    from diffaug.labels.balance import DonorBank
    from diffaug.labels.edit import LabelEdit

__all__ = ["JobContext", "WindowEdit", "BatchWorker", "crop_window", "edit_window", "window_bank", "class_counts",
           "changed_nuclei", "resolve_device"]


@dataclass(frozen=True)
class JobContext:
    """What a worker needs to run batches of a job; picklable, so Ray ships it to its actors.

    Attributes:
        data_root: the tile folder.
        classes: the class scheme the tiles are read in (``TileFolder(classes=...)``).
        scheme: that scheme.
        tiles: ``(name, (H, W))`` of every source tile, in plan order.
        size: window side (the model's image size).
        per_tile: outputs per window.
        limit: plan limit.
        seed: job seed.
        policy: ``"balance"``, ``"enlarge"`` or ``"both"``.
        balance: options of the balancing edit.
        enlarge: options of the enlarging edit.
        bank: the dataset's donor bank (built once per job), for balancing.
        weights: the weights (``weights.path`` is loaded).
        weights_record: the weights block every record carries (from ``job.json``).
        strength: partial-noise strength.
        num_inference_steps: DDIM steps.
        guidance_scale: guidance w.
        precision: ``"fp32"`` or ``"bf16"``.
        formats: output formats, a subset of ``("tiles", "hovernet")``.
        out: the output folder.
        tile_mpp: µm/px of the data, if declared.
    """

    data_root: Path
    classes: str
    scheme: ClassScheme
    tiles: tuple[tuple[str, tuple[int, int]], ...]
    size: int
    per_tile: int
    limit: int | None
    seed: int
    policy: str
    balance: Mapping[str, Any]
    enlarge: Mapping[str, Any]
    bank: DonorBank | None
    weights: WeightsInfo
    weights_record: Mapping[str, Any]
    strength: float
    num_inference_steps: int
    guidance_scale: float
    precision: str
    formats: tuple[str, ...]
    out: Path
    tile_mpp: float | None = None

    def items(self) -> list[Item]:
        """The job's plan."""
        return plan_items(self.tiles, size=self.size, per_tile=self.per_tile, limit=self.limit)

    @property
    def layout(self) -> Layout:
        return Layout(self.out)


@dataclass
class WindowEdit:
    """An item's edited window, ready to synthesise.

    Attributes:
        image: the real window, RGB uint8 (start of partial noising).
        before: the window's maps before the edit, ``(inst_map, type_map)``, ids renumbered 1..N.
        edit: the edit (its maps condition the synthesis).
        source_inst_id: per output nucleus, its id in the *source tile* (0: none).
        noise: the item's start noise, (1, 3, size, size) from its own generator.
    """

    image: np.ndarray
    before: tuple[np.ndarray, np.ndarray | None]
    edit: LabelEdit
    source_inst_id: np.ndarray
    noise: torch.Tensor | None = field(default=None, repr=False)


def crop_window(tile: Tile, item: Item) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """The item's window of ``tile``: image, instance map renumbered 1..N, type map, and the tile id of each nucleus.

    A nucleus cut by the window's border keeps the part inside, as HoVer-Net's patch extraction does.
    """
    from diffaug.labels.instances import instance_ids, relabel_sequential

    if tile.image is None:
        raise InvalidInputError(f"tile {tile.name!r} was read without its image; generation needs the images")
    rows, cols = item.window
    inst = tile.inst_map[rows, cols]
    typ = None if tile.type_map is None else np.ascontiguousarray(tile.type_map[rows, cols])
    return np.ascontiguousarray(tile.image[rows, cols]), relabel_sequential(inst), typ, instance_ids(inst)


def window_bank(bank: DonorBank, tile_name: str, tile_ids: np.ndarray) -> DonorBank:
    """``bank`` without the donors of ``tile_name`` whose ids are in the window (``tile_ids``).

    Those nuclei are in the window's own maps, where the edit finds them as same-tile donors (when they lie wholly
    inside); leaving them in the bank too could paste one nucleus twice into the window. The tile's donors outside
    the window stay in the bank.
    """
    from diffaug.labels.balance import DonorBank

    inside = set(tile_ids.tolist())
    keep = [d for d in bank.donors if d.tile != tile_name or d.id not in inside]
    if len(keep) == len(bank.donors):
        return bank
    return DonorBank(keep, bank.class_counts, rare_classes=bank.rare_classes)


def edit_window(inst_map: np.ndarray, type_map: np.ndarray | None, *, policy: str, rng: np.random.Generator,
                bank: DonorBank | None, tile_name: str, tile_ids: np.ndarray, balance: Mapping[str, Any],
                enlarge: Mapping[str, Any]) -> LabelEdit:
    """Apply the job's policy to one window; ``"both"`` balances, then enlarges the balanced map.

    Args:
        inst_map: the window's instance map, ids 1..N.
        type_map: its type map, or None.
        policy: ``"balance"``, ``"enlarge"`` or ``"both"``.
        rng: the item's generator (all randomness of the edit).
        bank: the dataset's donor bank (balancing).
        tile_name: the source tile.
        tile_ids: the source tile's id of window nucleus i+1 at index i.
        balance: options of :func:`~diffaug.labels.balance.balance_label_map`.
        enlarge: options of :func:`~diffaug.labels.enlarge.enlarge_label_map`.

    Returns:
        The edit. Ids in its record are the window's; a same-tile donor is named by its tile and tile id, like a
        bank donor. The record of ``"both"`` is ``{"policy": "both", "steps": [balance record, enlarge record]}``
        and its ``source_ids`` point into the input map through both edits.
    """
    from diffaug.labels.balance import balance_label_map
    from diffaug.labels.enlarge import enlarge_label_map

    if policy == "enlarge":
        return enlarge_label_map(inst_map, type_map, rng=rng, **enlarge)
    if bank is not None:
        bank = window_bank(bank, tile_name, tile_ids)
    balanced = balance_label_map(inst_map, type_map, rng=rng, bank=bank, **balance)
    for entry in balanced.record["replaced"]:
        donor = entry["donor"]
        if donor["same_tile"]:
            donor["tile"], donor["id"] = tile_name, int(tile_ids[donor["id"] - 1])
    if policy == "balance":
        return balanced
    moved = enlarge_label_map(balanced.inst_map, balanced.type_map, rng=rng, **enlarge)
    moved.source_ids = np.where(moved.source_ids > 0, balanced.source_ids[np.maximum(moved.source_ids, 1) - 1],
                                0).astype(np.int32)
    moved.record = {"policy": "both", "steps": [balanced.record, moved.record]}
    return moved


def class_counts(inst_map: np.ndarray, type_map: np.ndarray | None, scheme: ClassScheme) -> dict[str, int]:
    """Nuclei per class name (instance-only maps: all under ``"nucleus"``)."""
    from diffaug.labels.instances import instance_types

    if type_map is None:
        return {"nucleus": int(inst_map.max(initial=0))}
    counts = np.bincount(instance_types(inst_map, type_map), minlength=scheme.num_classes)
    return {name: int(counts[k]) for k, name in sorted(scheme.names.items())}


def changed_nuclei(record: Mapping[str, Any]) -> int:
    """Nuclei an edit replaced or moved, from its record."""
    if record.get("policy") == "both":
        return sum(changed_nuclei(step) for step in record["steps"])
    return int(record.get("n_replaced", record.get("n_moved", 0)))


def resolve_device(device: str | None) -> str:
    """``"cuda"`` when asked for or (with None) available, else ``"cpu"``; CUDA asked for but absent is an error."""
    import torch

    from diffaug.errors import ConfigError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here (torch "
                          f"{torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''}); "
                          "use --device cpu, or install the torch build for your CUDA")
    return device


class BatchWorker:
    """Runs batches of one job: loads the model once, then ``worker(batch)`` edits, synthesises and writes.

    Args:
        context: the job.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, context: JobContext, device: str) -> None:
        import torch

        from diffaug.data.tiles import TileFolder
        from diffaug.pipelines import SemanticSynthesisPipeline

        self.context = context
        self.layout = context.layout
        self.folder = TileFolder(context.data_root, classes=context.classes)
        self.pipeline = SemanticSynthesisPipeline.from_pretrained(str(context.weights.path)).to(device)
        self.autocast = torch.bfloat16 if context.precision == "bf16" else None
        self._tile: Tile | None = None

    def _read(self, name: str) -> Tile:
        if self._tile is None or self._tile.name != name:
            self._tile = self.folder.read(name)
        return self._tile

    def prepare(self, item: Item) -> WindowEdit:
        """Crop and edit the item's window, and draw its start noise (all from the item's own seed)."""
        import torch

        from diffaug.labels.validate import validate_label_map

        ctx = self.context
        image, inst, typ, tile_ids = crop_window(self._read(item.tile), item)
        rng, noise_gen = item_generators(item_seed(ctx.seed, item.index))
        edit = edit_window(inst, typ, policy=ctx.policy, rng=rng, bank=ctx.bank, tile_name=item.tile,
                           tile_ids=tile_ids, balance=ctx.balance, enlarge=ctx.enlarge)
        validate_label_map(edit.inst_map, edit.type_map, reference=inst, source_ids=edit.source_ids,
                           num_classes=ctx.scheme.num_classes if typ is not None else None,
                           where=f"edited window {item.name}")
        source = np.zeros(edit.source_ids.shape, dtype=np.int32)
        has_source = edit.source_ids > 0
        source[has_source] = tile_ids[edit.source_ids[has_source] - 1]
        noise = torch.randn((1, 3, item.size, item.size), generator=noise_gen, dtype=torch.float32)
        return WindowEdit(image=image, before=(inst, typ), edit=edit, source_inst_id=source, noise=noise)

    def synthesise(self, prepared: Sequence[WindowEdit]) -> list[np.ndarray]:
        """One pipeline call for the batch, each item with its own start noise."""
        import torch

        ctx = self.context
        types = [p.edit.type_map for p in prepared]
        out = self.pipeline(image=[p.image for p in prepared], inst_map=[p.edit.inst_map for p in prepared],
                            type_map=None if types[0] is None else types, strength=ctx.strength,
                            num_inference_steps=ctx.num_inference_steps, guidance_scale=ctx.guidance_scale,
                            noise=torch.cat([p.noise for p in prepared]), autocast_dtype=self.autocast)
        return out.images

    def record(self, item: Item, prepared: WindowEdit) -> dict[str, Any]:
        """The item's manifest record (identical whatever the engine, batch size or device)."""
        ctx = self.context
        edit = prepared.edit
        return {
            "index": item.index,
            "name": item.name,
            "source_tile": item.tile,
            "window": {"y0": item.y0, "x0": item.x0, "height": item.size, "width": item.size},
            "copy": item.copy,
            "seed": {"job": ctx.seed, "item": item_seed(ctx.seed, item.index)},
            "policy": ctx.policy,
            "nuclei": {"before": class_counts(*prepared.before, ctx.scheme),
                       "after": class_counts(edit.inst_map, edit.type_map, ctx.scheme),
                       "changed": changed_nuclei(edit.record)},
            "edit": edit.record,
            "weights": dict(ctx.weights_record),
            "strength": ctx.strength,
            "num_inference_steps": ctx.num_inference_steps,
            "guidance_scale": ctx.guidance_scale,
            "precision": ctx.precision,
            "mpp": {"tile": ctx.tile_mpp, "model": ctx.weights.mpp},
            "files": self.layout.outputs(item.name, ctx.formats),
        }

    def write(self, item: Item, prepared: WindowEdit, image: np.ndarray) -> None:
        """Write the item's outputs atomically, its record last (the record marks the item complete)."""
        from diffaug._io import atomic_write_text
        from diffaug.data.hovernet import write_hovernet_npy
        from diffaug.data.tiles import Tile, write_tile

        edit = prepared.edit
        if "tiles" in self.context.formats:
            write_tile(self.layout.tiles, item.name, inst_map=edit.inst_map, type_map=edit.type_map, image=image,
                       inst_type=edit.inst_type, source_inst_id=prepared.source_inst_id)
        if "hovernet" in self.context.formats:
            tile = Tile(item.name, image=image, inst_map=edit.inst_map, type_map=edit.type_map,
                        inst_type=edit.inst_type, scheme=self.context.scheme)
            write_hovernet_npy(self.layout.hovernet / f"{item.name}.npy", tile)
        line = json.dumps(self.record(item, prepared), separators=(",", ":"))
        atomic_write_text(self.layout.record(item.name), line + "\n")

    def __call__(self, batch: Sequence[Item]) -> list[str]:
        """Run one batch of the plan; returns the names of the items written."""
        prepared = [self.prepare(item) for item in batch]
        images = self.synthesise(prepared)
        for item, window, image in zip(batch, prepared, images):
            self.write(item, window, image)
        return [item.name for item in batch]
