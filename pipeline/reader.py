"""Our reader: which records each rank reads in which order, read by byte offset from the tars.

The train order is a fresh random permutation of the whole split every epoch, a fixed function
of (seed, epoch) and the same on every rank; rank r of w reads its contiguous 1/w of that
permutation (``shard_range``), so ranks are disjoint and together read every record once per
epoch. Val reads the split in file order, rank r the same contiguous 1/w. Batch b of an epoch
is a pure function of (seed, epoch, rank, b) — records *and* random draws (window, mirror,
lighting) — so a Loader can start an epoch at any batch without decoding the ones before it.

``Feed`` is the DALI ``external_source`` callback: each call hands DALI the next planned
batch (JPEG bytes sliced from memory-mapped tars, plus the train view's draws) and remembers
it, so the Loader knows the records — labels, shards, keys — of every batch DALI returns.
Labels never go through DALI: ``RecordTable.labels`` reads them from the tars here, once per
record. Everything handed to ``external_source`` costs the Python thread a per-sample
conversion and copy, which on a small CPU is taken from the decoders; keep it to the JPEGs
and two dense arrays of draws.
"""
from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import reference as ref
from records.format import RecordsError
from records.index import ShardIndex, parse_label, read_index
from records.jpeg import jpeg_error, jpeg_structure_error

_ORDER_STREAM, _DRAW_STREAM = 0x6F72, 0x6472   # separate random streams: order, draws


def shard_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the positions rank ``rank`` of ``world`` reads (start = total*rank//world)."""
    return total * rank // world, total * (rank + 1) // world


def epoch_order(total: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The split's records (0..total-1, file order) in epoch ``epoch``'s order: a permutation
    drawn from (seed, epoch) alone — every rank computes the same one — or file order."""
    if not shuffle:
        return np.arange(total)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _ORDER_STREAM])))
    return rng.permutation(total)


@dataclass(frozen=True)
class Plan:
    """What one rank reads: ``batches`` batches of ``batch_size`` per epoch from its part."""
    total: int          # records in the split
    rank: int
    world: int
    batch_size: int
    batches: int        # per epoch (drop_last: full batches only)
    seed: int
    shuffle: bool

    def part(self, epoch: int) -> np.ndarray:
        """This rank's records of ``epoch``, in reading order."""
        start, end = shard_range(self.total, self.rank, self.world)
        return epoch_order(self.total, self.seed, epoch, self.shuffle)[start:end]


class RecordTable:
    """Every record of a split (shards in order, records in file order), memory-mapped."""

    def __init__(self, files):
        self.shards: list[ShardIndex] = [read_index(t, i) for t, i in files]
        sizes = [len(s) for s in self.shards]
        self.first = np.concatenate([[0], np.cumsum(sizes)])    # global index of each shard's first
        self.shard_of = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        self.jpg = np.concatenate([s.jpg for s in self.shards])
        self.cls = np.concatenate([s.cls for s in self.shards])
        self._bytes: dict[int, np.ndarray] = {}
        self._labels = np.full(len(self.jpg), -1, np.int64)    # -1: not read yet
        self._checked = np.zeros(len(self.jpg), bool)           # structure checked (jpegs)

    def __len__(self) -> int:
        return len(self.jpg)

    def _shard_bytes(self, shard: int) -> np.ndarray:
        """The whole tar as a uint8 array over a read-only memory map (slicing it is cheaper
        than a ``np.frombuffer`` per record). The file descriptor is closed at once, so
        thousands of shards can stay mapped."""
        array = self._bytes.get(shard)
        if array is None:
            with open(self.shards[shard].tar, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            array = self._bytes[shard] = np.frombuffer(mapped, np.uint8)
        return array

    def slices(self, records: np.ndarray, which: np.ndarray) -> list[np.ndarray]:
        """Zero-copy uint8 views of one component (``self.jpg`` or ``self.cls``) of ``records``."""
        out = []
        for r, (offset, size) in zip(records.tolist(), which[records].tolist()):
            out.append(self._shard_bytes(int(self.shard_of[r]))[offset:offset + size])
        return out

    def jpegs(self, records: np.ndarray) -> list[np.ndarray]:
        """The JPEG bytes of ``records`` (``slices``); a record read for the first time is
        checked first (``records.jpeg.jpeg_structure_error``: markers and header, no decode)
        and a damaged one is a RecordsError naming its shard and key. Do not drop the check:
        DALI's CPU decoder can crash the process (SIGSEGV) on a damaged header, where this
        error lets the run save and stop. Once per record (a bit per record), so only a
        run's first epoch pays it."""
        out = self.slices(records, self.jpg)
        first = np.flatnonzero(~self._checked[records])
        for i in first.tolist():
            if why := jpeg_structure_error(out[i]):
                r = int(records[i])
                raise RecordsError(f"{self.where(r)}: record {self.key(r)}: bad JPEG ({why})")
        self._checked[records[first]] = True
        return out

    def labels(self, records: np.ndarray) -> np.ndarray:
        """int64 class indices of ``records`` from their ``.cls`` (each parsed once, then kept:
        8 bytes per record). A .cls that is not a decimal class index is a RecordsError
        naming its shard and key."""
        records = np.asarray(records, np.int64)
        todo = records[self._labels[records] < 0]
        if todo.size:
            parsed = []
            where = zip(todo.tolist(), self.shard_of[todo].tolist(), self.cls[todo].tolist())
            for r, shard, (offset, size) in where:
                raw = self._shard_bytes(shard)[offset:offset + size].tobytes()
                try:
                    parsed.append(parse_label(raw))
                except ValueError:
                    raise RecordsError(f"{self.where(r)}: record {self.key(r)}: .cls {raw[:20]!r} is not a "
                                       "decimal class index; run python -m prep.verify, repair the records (the build "
                                       "command plus --repair)") from None
            self._labels[todo] = parsed
        return self._labels[records]

    def key(self, record: int) -> str:
        s = int(self.shard_of[record])
        return self.shards[s].keys[record - self.first[s]].decode()

    def where(self, record: int) -> Path:
        return self.shards[int(self.shard_of[record])].tar


@dataclass(frozen=True)
class Batch:
    """One batch handed to DALI: its place in the epoch and its records (global indices)."""
    epoch: int
    index: int
    records: np.ndarray


class Feed:
    """The ``external_source`` callback: planned batches one after the other, epoch after
    epoch, from a cursor the Loader sets (``seek``). ``fed`` holds the batches DALI has been
    given and not yet returned, oldest first (pipe.run() returns ``fed[0]``'s outputs)."""

    def __init__(self, table: RecordTable, plan: Plan, draws: float | None, epoch: int = 0):
        self.table, self.plan = table, plan
        self.lighting_std = draws          # None: no draws (val views, the decode floor)
        self.fed: deque[Batch] = deque()
        self._cursor = (epoch, 0)
        self._parts: dict[int, np.ndarray] = {}

    def seek(self, epoch: int, index: int) -> None:
        self._cursor = (epoch, index)

    def next_position(self) -> tuple[int, int]:
        """(epoch, batch) DALI's next run returns if nothing changes: the oldest fed batch, or
        the cursor."""
        return (self.fed[0].epoch, self.fed[0].index) if self.fed else self._cursor

    def _part(self, epoch: int) -> np.ndarray:
        if epoch not in self._parts:
            if len(self._parts) >= 2:      # keep the current and the next epoch's order
                del self._parts[min(self._parts)]
            self._parts[epoch] = self.plan.part(epoch)
        return self._parts[epoch]

    def batch(self, epoch: int, index: int) -> Batch:
        size = self.plan.batch_size
        return Batch(epoch, index, self._part(epoch)[index * size:(index + 1) * size])

    def __call__(self):
        epoch, index = self._cursor
        batch = self.batch(epoch, index)
        self._cursor = (epoch, index + 1) if index + 1 < self.plan.batches else (epoch + 1, 0)
        self.fed.append(batch)
        outputs = [self.table.jpegs(batch.records)]
        if self.lighting_std is not None:
            outputs += draws(self.plan, epoch, index, len(batch.records), self.lighting_std)
        return tuple(outputs)


def draws(plan: Plan, epoch: int, index: int, n: int, lighting_std: float) -> list[np.ndarray]:
    """The train view's random draws of one batch, from (seed, epoch, rank, batch) alone, as
    two dense arrays: window (n, 3) int32 = offsets y, x uniform on 0..32 and mirror 0/1
    (p = 0.5); alpha (n, 3) float32 = the lighting coefficients ~ N(0, lighting_std)
    (zeros when 0). Changing the order of the draws changes every run's augmentations."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [plan.seed, epoch, plan.rank, index, _DRAW_STREAM])))
    y, x = rng.integers(0, ref.MAX_OFFSET + 1, size=(2, n), dtype=np.int32)
    mirror = rng.integers(0, 2, size=n, dtype=np.int32)
    alpha = rng.normal(0.0, 1.0, size=(n, 3)).astype(np.float32) * np.float32(lighting_std)
    return [np.stack([y, x, mirror], axis=1), alpha]


def undecodable(table: RecordTable, batches) -> list[tuple[Path, str, str]]:
    """(tar, key, why) of every record of ``batches`` that does not decode (prep.verify's
    check: PIL, and libturbojpeg's strict mode where installed): the culprits of a failed
    DALI run, which names none."""
    bad, seen = [], set()
    for batch in batches:
        for r, jpeg in zip(batch.records.tolist(), table.slices(batch.records, table.jpg)):
            if r not in seen and (why := jpeg_error(jpeg.tobytes())):   # prefetch can hold the
                bad.append((table.where(r), table.key(r), why))          # next epoch's batch too
            seen.add(r)
    return bad


def check_count(table: RecordTable, total: int, meta: Path) -> None:
    if len(table) != total:
        raise RecordsError(f"{meta}: counts say {total} records but the index files list {len(table)}")
