"""The online pool: a bounded store of synthetic (image, inst_map, type_map) pairs shared by DataLoader workers.

Why a pool (SPEC §4): one DiffMix image at 256 px costs about a second on a fast GPU, while a HoVer-Net loop eats
100-400 samples/s, so an online transform cannot render a fresh image per sample. A *generator* (a thread of the
main process, or one process per GPU) renders pairs into the pool; the transform, running in the loader's workers,
takes pool pairs at a set ratio and reuses each pair up to ``reuse`` times. When the pool is empty it returns the
real sample: a take never waits for the generator.

**Design choice: a memory-mapped file with ``flock`` locks.** The pool lives in one file (in ``/dev/shm`` where it
exists, so in RAM) holding a header, a per-slot state table and fixed-size slots. Any process attaches by the
file's path, :attr:`SynthesisPool.name`. That makes the pool

- *addressable by a string*, so :class:`~diffaug.transforms.DiffMixTransform` keeps only the name and stays
  serialisable with ``A.to_dict`` / ``A.save`` (a pool object in its arguments would break that, as a model object
  does);
- *shared across ``fork`` and ``spawn`` workers* without a server process: a pair is copied once from the slot into
  the worker, not pickled through a ``multiprocessing.Manager`` queue (about 3 MB per 540² pair);
- *lock-light*: the table is guarded by an exclusive ``flock`` held only while a few integers change (microseconds);
  pixel data are copied outside the lock. A slot that is being read is never overwritten: readers are counted and
  a slot returns to the writer only when its last use is done.

It needs POSIX ``fcntl`` (Linux, macOS). The creator deletes the file when it closes the pool or exits; a process
killed outright (SIGKILL) leaves ``diffaug-pool-<pid>-<id>.bin`` behind in ``/dev/shm``, to delete by hand. A worker
killed while copying a pair leaves that slot counted as being read, so it is not reused (the pool shrinks by one). Each pair is reused at most ``reuse`` times; the pool reports hits, misses,
pairs produced and retired, and mean reuse (:meth:`SynthesisPool.stats`). A take is random among the filled slots,
drawn from the caller's ``numpy.random.Generator``; which pairs are in the pool depends on timing, so pool draws are
not reproducible run to run (inline synthesis is).

Example:
    >>> pool = SynthesisPool.create(capacity=64, tile_shape=(256, 256), reuse=4)  # doctest: +SKIP
    >>> pool.prefill_from_folder("generated/")  # doctest: +SKIP
    >>> DiffMixTransform(model="diffmix-consep", pool=pool.name, p=0.3)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffaug.errors import DataFormatError, InvalidInputError

__all__ = ["SynthesisPool", "PoolPair", "PoolStats", "PoolFiller", "attach_pool"]

_MAGIC = b"DIFFAUGPOOL\x00\x00\x00\x01\x00"  # 16 bytes, last bytes carry the layout version
_HEADER_BYTES = 4096
_ALIGN = 64

# Header integers (int64) after the magic: geometry, then counters.
_H_CAPACITY, _H_HEIGHT, _H_WIDTH, _H_WITH_TYPES, _H_REUSE = range(5)
_H_HITS, _H_MISSES, _H_PRODUCED, _H_RETIRED, _H_NEXT_SEQ = range(5, 10)
_H_FIELDS = 16

# Slot table columns (int64).
_S_STATE, _S_USES_LEFT, _S_READERS, _S_SEQ, _S_USES = range(5)
_S_FIELDS = 8
EMPTY, WRITING, FULL = 0, 1, 2


@dataclass(frozen=True)
class PoolPair:
    """A synthetic pair taken from the pool (copies; the slot may be reused afterwards)."""

    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray | None
    seq: int
    """Serial number of the pair in the pool (0, 1, ...), to log which pair a sample came from."""
    use: int
    """Which use of this pair this take was (1..reuse)."""


@dataclass(frozen=True)
class PoolStats:
    """Counters of a pool, summed over every process that used it."""

    capacity: int
    filled: int
    hits: int
    misses: int
    produced: int
    retired: int
    reuse: int

    @property
    def hit_rate(self) -> float:
        """Fraction of takes that got a pair (0 when nothing was asked)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def mean_reuse(self) -> float:
        """Uses per produced pair so far (at most ``reuse``)."""
        return self.hits / self.produced if self.produced else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"capacity": self.capacity, "filled": self.filled, "hits": self.hits, "misses": self.misses,
                "produced": self.produced, "retired": self.retired, "reuse": self.reuse,
                "hit_rate": self.hit_rate, "mean_reuse": self.mean_reuse}


def _default_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _require_fcntl() -> Any:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise InvalidInputError("the synthesis pool needs POSIX file locks (fcntl), which this platform lacks; use "
                                "inline synthesis (no pool) or pre-generate with `diffaug generate`") from None
    return fcntl


class SynthesisPool:
    """A bounded pool of synthetic pairs in a shared memory-mapped file. Create with :meth:`create`, attach with
    :meth:`attach` (or :func:`attach_pool`); both give the same object type.

    Picklable: a pickled pool re-attaches by name in the receiving process. Only the creator deletes the file
    (:meth:`unlink`, or leaving a ``with`` block).
    """

    def __init__(self, name: str | os.PathLike[str], *, _owner: bool = False) -> None:
        self.name = str(name)
        self._owner = _owner
        self._open()
        if _owner:  # delete the backing file when the creator exits without unlink() (never from a forked child)
            weakref.finalize(self, _unlink_if_creator, self.name, os.getpid())

    # ----------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, capacity: int, tile_shape: tuple[int, int], *, reuse: int = 4, with_types: bool = True,
               directory: str | os.PathLike[str] | None = None) -> SynthesisPool:
        """Create an empty pool.

        Args:
            capacity: number of slots (pairs held at once), >= 1.
            tile_shape: (H, W) of every pair; samples the pool serves must have this size.
            reuse: how many times each pair is handed out before its slot is freed, >= 1.
            with_types: whether pairs carry a type map (False for instance-only data).
            directory: where the backing file goes; default ``/dev/shm`` (RAM) or the temp folder.
        """
        _require_fcntl()
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise InvalidInputError(f"pool capacity must be an integer >= 1, got {capacity!r}")
        if isinstance(reuse, bool) or not isinstance(reuse, (int, np.integer)) or reuse < 1:
            raise InvalidInputError(f"pool reuse must be an integer >= 1 (uses per synthetic pair), got {reuse!r}")
        if (not isinstance(tile_shape, (tuple, list)) or len(tile_shape) != 2
                or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in tile_shape)):
            raise InvalidInputError(f"pool tile_shape must be (H, W) with positive integers, got {tile_shape!r}")
        h, w = int(tile_shape[0]), int(tile_shape[1])
        directory = Path(directory) if directory is not None else _default_dir()
        if not directory.is_dir():
            raise InvalidInputError(f"pool directory {directory} does not exist")
        path = directory / f"diffaug-pool-{os.getpid()}-{uuid.uuid4().hex[:12]}.bin"
        slot_table = _aligned(capacity * _S_FIELDS * 8)
        slot_bytes = _slot_bytes(h, w, with_types)
        total = _HEADER_BYTES + slot_table + capacity * slot_bytes
        with open(path, "xb") as f:
            f.truncate(total)
            f.seek(0)
            header = np.zeros(_H_FIELDS, dtype=np.int64)
            header[[_H_CAPACITY, _H_HEIGHT, _H_WIDTH, _H_WITH_TYPES, _H_REUSE]] = [capacity, h, w, int(with_types),
                                                                                  reuse]
            f.write(_MAGIC + header.tobytes())
        return cls(path, _owner=True)

    @classmethod
    def attach(cls, name: str | os.PathLike[str]) -> SynthesisPool:
        """Attach to an existing pool by its :attr:`name` (the backing file's path)."""
        return cls(name)

    def _open(self) -> None:
        _require_fcntl()
        path = Path(self.name)
        if not path.is_file():
            raise InvalidInputError(f"no synthesis pool at {path}; create one with SynthesisPool.create(...) in the "
                                    "main process and pass its .name (the pool is gone once its creator closed it)")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r+")
        if bytes(self._mm[:len(_MAGIC)]) != _MAGIC:
            raise DataFormatError(f"{path}: not a diffaug synthesis pool (bad header); pass SynthesisPool.name")
        self._header = np.ndarray((_H_FIELDS,), dtype=np.int64, buffer=self._mm, offset=len(_MAGIC))
        self.capacity = int(self._header[_H_CAPACITY])
        self.tile_shape = (int(self._header[_H_HEIGHT]), int(self._header[_H_WIDTH]))
        self.with_types = bool(self._header[_H_WITH_TYPES])
        self.reuse = int(self._header[_H_REUSE])
        self._slots = np.ndarray((self.capacity, _S_FIELDS), dtype=np.int64, buffer=self._mm, offset=_HEADER_BYTES)
        self._data_offset = _HEADER_BYTES + _aligned(self.capacity * _S_FIELDS * 8)
        self._slot_bytes = _slot_bytes(*self.tile_shape, self.with_types)
        self._lock_fd: int | None = None
        self._lock_pid = -1
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        """Detach this handle (the pool stays for other processes)."""
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None
        mm = getattr(self, "_mm", None)
        if mm is not None:
            del self._header, self._slots
            self._mm = None  # type: ignore[assignment]
            del mm

    def unlink(self) -> None:
        """Close and delete the backing file (creator only). Attached processes keep their mapping until they exit."""
        self.close()
        if self._owner:
            Path(self.name).unlink(missing_ok=True)

    def __enter__(self) -> SynthesisPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlink()

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self._owner = False
        self._open()

    def __repr__(self) -> str:
        return (f"SynthesisPool(name={self.name!r}, capacity={self.capacity}, tile_shape={self.tile_shape}, "
                f"reuse={self.reuse})")

    # ----------------------------------------------------------------------------------------------- locking
    def _locked(self) -> _PoolLock:
        if self._mm is None:
            raise InvalidInputError(f"synthesis pool {self.name} is closed")
        pid = os.getpid()
        if self._lock_pid != pid:  # a forked child must not share the parent's open file description
            self._lock_fd = os.open(self.name, os.O_RDWR)
            self._lock_pid = pid
            self._thread_lock = threading.Lock()
        return _PoolLock(self._lock_fd, self._thread_lock)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------------------------- data views
    def _views(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        h, w = self.tile_shape
        base = self._data_offset + slot * self._slot_bytes
        image = np.ndarray((h, w, 3), dtype=np.uint8, buffer=self._mm, offset=base)
        off = base + _aligned(h * w * 3)
        inst = np.ndarray((h, w), dtype=np.int32, buffer=self._mm, offset=off)
        types = None
        if self.with_types:
            types = np.ndarray((h, w), dtype=np.int32, buffer=self._mm, offset=off + _aligned(h * w * 4))
        return image, inst, types

    # ----------------------------------------------------------------------------------------------- producer
    def _check_pair(self, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None, where: str) -> None:
        from diffaug.data.tiles import check_label_maps

        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(f"{where}: image must be uint8 (H, W, 3), got "
                                    f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
        if image.shape[:2] != self.tile_shape:
            raise InvalidInputError(f"{where}: pair is {image.shape[:2]} but this pool holds {self.tile_shape} tiles")
        if self.with_types and type_map is None:
            raise InvalidInputError(f"{where}: this pool holds type maps; pass type_map")
        if not self.with_types and type_map is not None:
            raise InvalidInputError(f"{where}: this pool was created with with_types=False; pass no type_map")
        check_label_maps(inst_map, type_map, where=where, image_shape=image.shape)
        if inst_map.max(initial=0) > np.iinfo(np.int32).max:
            raise InvalidInputError(f"{where}: inst_map ids exceed int32")

    def put(self, image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray | None = None, *,
            timeout: float | None = 0.0, stop: threading.Event | None = None, poll: float = 0.01) -> bool:
        """Add a pair (producer side). Waits for a free slot up to ``timeout`` seconds (None: until one frees up or
        ``stop`` is set). Returns True when stored, False when the pool stayed full."""
        self._check_pair(image, inst_map, type_map, "pool.put")
        waited = 0.0
        while True:
            slot = self._claim_empty()
            if slot is not None:
                break
            if (timeout is not None and waited >= timeout) or (stop is not None and stop.is_set()):
                return False
            if stop is not None:
                stop.wait(poll)
            else:
                threading.Event().wait(poll)
            waited += poll
        img_v, inst_v, type_v = self._views(slot)
        try:
            img_v[...] = image
            inst_v[...] = inst_map
            if type_v is not None:
                type_v[...] = type_map
        except BaseException:
            with self._locked():
                self._slots[slot, _S_STATE] = EMPTY
            raise
        with self._locked():
            seq = int(self._header[_H_NEXT_SEQ])
            self._header[_H_NEXT_SEQ] = seq + 1
            self._header[_H_PRODUCED] += 1
            self._slots[slot] = 0
            self._slots[slot, [_S_STATE, _S_USES_LEFT, _S_SEQ]] = [FULL, self.reuse, seq]
        return True

    def _claim_empty(self) -> int | None:
        with self._locked():
            free = np.flatnonzero(self._slots[:, _S_STATE] == EMPTY)
            if free.size == 0:
                return None
            slot = int(free[0])
            self._slots[slot, _S_STATE] = WRITING
            return slot

    # ----------------------------------------------------------------------------------------------- consumer
    def try_take(self, rng: np.random.Generator) -> PoolPair | None:
        """Take a pair without waiting (consumer side): a random filled slot, or None when the pool is empty.

        Counts a hit or a miss. The slot is freed for the producer after its ``reuse``-th use.
        """
        with self._locked():
            available = np.flatnonzero((self._slots[:, _S_STATE] == FULL) & (self._slots[:, _S_USES_LEFT] > 0))
            if available.size == 0:
                self._header[_H_MISSES] += 1
                return None
            slot = int(available[rng.integers(available.size)])
            row = self._slots[slot]
            row[_S_USES_LEFT] -= 1
            row[_S_READERS] += 1
            row[_S_USES] += 1
            use, seq = int(row[_S_USES]), int(row[_S_SEQ])
            self._header[_H_HITS] += 1
        try:
            img_v, inst_v, type_v = self._views(slot)
            pair = PoolPair(image=img_v.copy(), inst_map=inst_v.copy(),
                            type_map=None if type_v is None else type_v.copy(), seq=seq, use=use)
        finally:
            with self._locked():
                row = self._slots[slot]
                row[_S_READERS] -= 1
                if row[_S_USES_LEFT] == 0 and row[_S_READERS] == 0:
                    row[_S_STATE] = EMPTY
                    self._header[_H_RETIRED] += 1
        return pair

    # ----------------------------------------------------------------------------------------------- reporting
    def stats(self) -> PoolStats:
        with self._locked():
            h = self._header.copy()
            filled = int(((self._slots[:, _S_STATE] == FULL) & (self._slots[:, _S_USES_LEFT] > 0)).sum())
        return PoolStats(capacity=self.capacity, filled=filled, hits=int(h[_H_HITS]), misses=int(h[_H_MISSES]),
                         produced=int(h[_H_PRODUCED]), retired=int(h[_H_RETIRED]), reuse=self.reuse)

    def __len__(self) -> int:
        """Pairs available now."""
        return self.stats().filled

    # ----------------------------------------------------------------------------------------------- from disk
    def prefill_from_folder(self, folder: str | os.PathLike[str], *, limit: int | None = None,
                            rng: np.random.Generator | None = None) -> int:
        """Fill free slots with pairs from a generated tile folder (``NAME.png`` + ``NAME.npz``, e.g. the output of
        ``diffaug generate``). Tiles must have the pool's tile shape. Tiles are taken in name order, or shuffled
        with ``rng``. Stops when the pool is full; returns the number of pairs added.
        """
        from diffaug.data.tiles import TileFolder

        tiles = TileFolder(folder)
        if self.with_types and not tiles.has_classes:
            raise DataFormatError(f"{folder}: tiles have no type maps (no classes.json) but the pool holds type maps; "
                                  "create the pool with with_types=False")
        names = list(tiles.names)
        if rng is not None:
            names = [names[i] for i in rng.permutation(len(names))]
        added = 0
        for name in names:
            if limit is not None and added >= limit:
                break
            tile = tiles.read(name)
            if tile.shape != self.tile_shape:
                raise DataFormatError(f"{Path(folder) / name}.npz: tile is {tile.shape} but the pool holds "
                                      f"{self.tile_shape} tiles; generate tiles of the training patch size")
            types = tile.type_map if self.with_types else None
            if not self.put(tile.image, tile.inst_map, types, timeout=0.0):  # type: ignore[arg-type]
                break
            added += 1
        return added


class _PoolLock:
    """Exclusive flock on the pool file plus a thread lock (flock does not exclude threads sharing one fd)."""

    def __init__(self, fd: int, thread_lock: threading.Lock) -> None:
        self.fd = fd
        self.thread_lock = thread_lock

    def __enter__(self) -> None:
        import fcntl

        self.thread_lock.acquire()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()


def _unlink_if_creator(path: str, pid: int) -> None:
    if os.getpid() == pid:
        Path(path).unlink(missing_ok=True)


def _slot_bytes(h: int, w: int, with_types: bool) -> int:
    return _aligned(h * w * 3) + _aligned(h * w * 4) * (2 if with_types else 1)


_ATTACHED: dict[tuple[int, str], SynthesisPool] = {}


def attach_pool(name: str) -> SynthesisPool:
    """The pool called ``name``, attached once per process (cached)."""
    key = (os.getpid(), str(name))
    pool = _ATTACHED.get(key)
    if pool is None or pool._mm is None:
        pool = _ATTACHED[key] = SynthesisPool.attach(name)
    return pool


# --------------------------------------------------------------------------------------------------- the generator
PairMaker = Callable[[int], "tuple[np.ndarray, np.ndarray, np.ndarray | None]"]


def _fill_loop(pool: SynthesisPool, make_pair: PairMaker, indices: Iterable[int], stop: Any,
               errors: Any) -> None:
    try:
        for index in indices:
            if stop.is_set():
                return
            image, inst_map, type_map = make_pair(index)
            if not pool.put(image, inst_map, type_map if pool.with_types else None, timeout=None, stop=stop):
                return
    except Exception as exc:  # reported, with its traceback, by PoolFiller.check() / stop()
        import traceback

        errors.put((f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def _process_main(name: str, make_pair: PairMaker, indices: Iterable[int], stop: Any, errors: Any) -> None:
    _fill_loop(SynthesisPool.attach(name), make_pair, indices, stop, errors)


class PoolFiller:
    """The generator that keeps a pool filled: a background thread of this process, or a separate process (one per
    GPU, e.g. ``device="cuda:1"`` inside ``make_pair``).

    Args:
        pool: the pool to fill.
        make_pair: ``make_pair(index) -> (image, inst_map, type_map)``; for example a
            :class:`~diffaug.transforms.DiffMixSynthesizer`. It must be picklable for ``process=True``.
        indices: item indices to produce, in order (default 0, 1, 2, ... forever). Give each filler process its own
            indices (e.g. ``range(rank, N, world)``) so their pairs differ.
        process: run in a ``spawn`` process instead of a thread. A thread suits one GPU driven by the main process
            (torch releases the GIL in its kernels); use one process per extra GPU.

    The filler blocks only itself: when the pool is full it waits for a slot, never the loader.
    """

    def __init__(self, pool: SynthesisPool, make_pair: PairMaker, *, indices: Iterable[int] | None = None,
                 process: bool = False) -> None:
        import itertools

        self.pool = pool
        self.make_pair = make_pair
        self.indices = indices if indices is not None else itertools.count()
        self.process = process
        self._worker: Any = None
        if process:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self._stop: Any = ctx.Event()
            self._errors: Any = ctx.Queue()
        else:
            import queue

            self._stop = threading.Event()
            self._errors = queue.Queue()

    def start(self) -> PoolFiller:
        if self._worker is not None:
            raise InvalidInputError("this PoolFiller was already started")
        if self.process:
            import multiprocessing as mp

            self._worker = mp.get_context("spawn").Process(
                target=_process_main, args=(self.pool.name, self.make_pair, self.indices, self._stop, self._errors),
                daemon=True, name="diffaug-pool-filler")
        else:
            self._worker = threading.Thread(
                target=_fill_loop, args=(self.pool, self.make_pair, self.indices, self._stop, self._errors),
                daemon=True, name="diffaug-pool-filler")
        self._worker.start()
        return self

    def check(self) -> None:
        """Raise if the generator failed (its error message is re-raised here)."""
        if not self._errors.empty():
            from diffaug.errors import DiffaugError

            message, trace = self._errors.get()
            raise DiffaugError(f"the pool generator failed: {message}\n--- generator traceback ---\n{trace}")

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the generator to stop after its current pair and wait for it; re-raises its error, if any."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        self.check()

    def __enter__(self) -> PoolFiller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

