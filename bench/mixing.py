"""How differently consecutive epochs order the training records, next to two independent
random permutations (the ideal).

    python -m bench.mixing --records data/records --batch-size 50 [--world 2] [--epochs 4]
    python -m bench.mixing --total 1281167 --batch-size 256 --world 8    # no records needed

For each pair of consecutive epochs: the order correlation (Pearson's r of each record's
position in epoch e and e+1 on its rank; 0 ± 1/sqrt(n) for independent orders), the share of
records that land in the same batch (same rank, same batch number; 1/batches for
independent orders) and the share of batch-mate pairs of epoch e that are batch-mates
again in e+1 ((B-1)/(n-1)); with several ranks, over the records a rank reads in both. The orders are the Loader's own (pipeline/reader.py's plan),
computed without decoding.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from common.cli import run_command
from common.config import check_at_least, parse_args
from pipeline import reader
from records.folder import shard_paths


@dataclass(frozen=True)
class MixingConfig:
    records: str | None = field(default=None, metadata={"help": "records folder (its train split)"})
    total: int | None = field(default=None, metadata={"help": "records in the split, instead of --records"})
    batch_size: int = field(default=50, metadata={"help": "images per batch"})
    world: int = field(default=1, metadata={"help": "ranks"})
    epochs: int = field(default=3, metadata={"help": "epochs to compare (consecutive pairs)"})
    seed: int = field(default=0, metadata={"help": "the Loader's seed"})

    def __post_init__(self):
        if (self.records is None) == (self.total is None):
            raise ValueError("give exactly one of --records and --total")
        check_at_least(self, ("batch_size", "world", "total"))
        check_at_least(self, ("epochs",), minimum=2)


def rank_batches(plan: reader.Plan, epoch: int) -> np.ndarray:
    """(batches, batch_size) record indices this rank reads in ``epoch`` (full batches)."""
    part = plan.part(epoch)[:plan.batches * plan.batch_size]
    return part.reshape(plan.batches, plan.batch_size)


def mixing(a: np.ndarray, b: np.ndarray) -> dict:
    """Statistics of two epochs' batches of one rank, each (batches, batch_size) of record
    indices (records absent from one epoch are ignored)."""
    common = np.intersect1d(a.ravel(), b.ravel())
    pos_a, pos_b = _positions(a, common), _positions(b, common)
    r = float(np.corrcoef(pos_a, pos_b)[0, 1])
    batch = a.shape[1]
    same_batch = float(np.mean(pos_a // batch == pos_b // batch))
    # batch-mate pairs of a that are batch-mates in b: per batch of a, the pairs sharing a batch of b
    which_b = np.full(max(a.max(), b.max()) + 1, -1)
    which_b[b.ravel()] = np.repeat(np.arange(b.shape[0]), batch)
    again = pairs = 0      # pairs: batch-mates of a that this rank reads in b too
    for row in a:
        held = which_b[row][which_b[row] >= 0]
        counts = np.bincount(held)
        again += int((counts * (counts - 1) // 2).sum())
        pairs += len(held) * (len(held) - 1) // 2
    return {"n": len(common), "r": r, "same_batch": same_batch, "pairs_again": again / max(1, pairs),
            "ideal_same_batch": 1 / a.shape[0], "ideal_pairs": (batch - 1) / (b.size - 1),
            "ideal_r_sd": 1 / np.sqrt(len(common) - 1)}


def _positions(batches: np.ndarray, records: np.ndarray) -> np.ndarray:
    flat = batches.ravel()
    where = np.empty(flat.max() + 1, np.int64)
    where[flat] = np.arange(flat.size)
    return where[records]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(MixingConfig, argv, prog="python -m bench.mixing", description=__doc__.split("\n\n")[0])
    return run_command(lambda: print_mixing(cfg))


def print_mixing(cfg: MixingConfig) -> None:
    total = cfg.total or len(reader.RecordTable(shard_paths(cfg.records, "train")))
    print(f"{total} records, {cfg.world} rank(s), batch {cfg.batch_size}, seed {cfg.seed}")
    for rank in range(cfg.world):
        start, end = reader.shard_range(total, rank, cfg.world)
        plan = reader.Plan(total=total, rank=rank, world=cfg.world, batch_size=cfg.batch_size,
                           batches=(total // cfg.world) // cfg.batch_size, seed=cfg.seed, shuffle=True)
        for e in range(cfg.epochs - 1):
            m = mixing(rank_batches(plan, e), rank_batches(plan, e + 1))
            print(f"rank {rank} epochs {e}->{e + 1}: order correlation {m['r']:+.4f} "
                  f"(independent: 0 ± {m['ideal_r_sd']:.4f}), same batch {m['same_batch']:.2%} "
                  f"(independent: {m['ideal_same_batch']:.2%}), batch-mate pairs again "
                  f"{m['pairs_again']:.3%} (independent: {m['ideal_pairs']:.3%}); "
                  f"{m['n']} of {end - start} records in both")


if __name__ == "__main__":
    sys.exit(main())
