"""Build the records: ImageNet (or the built-in sample set) -> 256x256 JPEG shards + exact stats.

    python prep/build_records.py                      # built-in sample set -> data/records
    python prep/build_records.py --source /data/imagenet --out /data/records [--workers 32]
        [--shard-size 1000] [--quality 90] [--val-labels LOC_val_solution.csv] [--ffcv] [--overwrite] [--repair]
        [--class-names LOC_synset_mapping.txt] [--val-fraction 0.1]

Writes (see records/ for the readers and docs/records.md for the details):
    OUT/train/shard-NNNNNN.tar + .idx   train records, globally shuffled (seeded) at write time
    OUT/val/shard-NNNNNN.tar + .idx     val records in sorted order
    OUT/stats.json                      exact RGB mean/std/cov/eigen-decomposition of train pixels
    OUT/stats.png                       the three eigen-colours as swatches (mean ± k·√λ·p)
    OUT/mean_image.npy                  per-pixel mean train image (float64 256x256x3, 0-255)
    OUT/skipped.json                    inputs left out, with the reason
    OUT/train/keys.tsv, OUT/val/keys.tsv  key, shard, source path of every record
    OUT/meta.json                       classes, counts, shards, source, params, versions (written last)
    OUT/train.beton, OUT/val.beton      FFCV's format, with --ffcv

Work is split into shards (one task each, over ``--workers`` processes). A shard's tar and index
appear only when complete (temp name + rename) and its integer pixel sums are kept in
OUT/.partial/ until the build finishes, so a rerun after Ctrl-C or a kill redoes only the
unfinished shards and ends with exactly the output of an uninterrupted run. A worker process
that dies (out-of-memory killer, a crash) ends the build with one line naming its shard, exit 2.
Workers die with the build (PR_SET_PDEATHSIG on Linux) and keep no copy of OUT's lock. Exit
status: 0 done, 2 one `error:` line (bad input, an OS failure, a dead worker), 130 Ctrl-C,
143 SIGTERM (one line; rerun to resume). A rerun after any kill ends with exactly the tree of an
uninterrupted build (a kill after meta.json: the rerun removes what finishing had left).
meta.json keeps the CRC-32 of every shard: the same command with ``--repair`` rebuilds exactly
the shards damaged or lost since (prep/repair.py), and prep.verify reports them.

The stages, each in its own module: prep/config.py (PrepConfig), prep/source.py (listing),
prep/plan.py (order, shards, identity), prep/outdir.py (lock, reuse/resume/refuse, stale
leftovers), prep/workers.py (one shard per task, process pool), prep/finish.py (stats, meta),
prep/repair.py (--repair).
This file ties them together (``build``) and is the command line (``main``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common.atomic import write_json
from common.cli import run_command
from common.config import parse_args
from common.system import usable_cores
from prep.config import PrepConfig, PrepError  # noqa: F401  (re-exported: the public entry point)
from prep.finish import collect, finish, names_of, summary as _summary, write_keys
from prep.outdir import clean_stale, locked_out, prepare_out, remove_temp_files
from prep.plan import ShardTask, params_of, plan
from prep.repair import repair, repair_statistics, statistics_from_records
from prep.source import Source, read_class_names, scan
from prep.workers import PARTIAL, Stopped, raise_stopped, run_tasks, shard_done
from records.format import DEFAULT_RECORDS, DEFAULT_SAMPLE
from records.keys import KEYS_FILE

SAMPLE_MARKER = ".sample-complete.json"
SYNSET_MAPPING = "LOC_synset_mapping.txt"   # ImageNet's class names, read from SOURCE where it is there
SAMPLE_PARAMS = {"classes": 10, "train_per_class": 100, "val_per_class": 20, "seed": 0}  # the built-in set
SAMPLE_VERSION = 6  # bump when prep/sample.py draws different images: an older data/sample is redrawn


def ensure_sample(root: Path, progress: bool) -> None:
    """Generate the built-in sample set into ``root`` unless a complete one is there."""
    marker = {**SAMPLE_PARAMS, "version": SAMPLE_VERSION}
    try:
        if json.loads((root / SAMPLE_MARKER).read_text()) == marker:
            return
    except (OSError, ValueError):
        pass
    from prep.sample import make_sample_set
    if progress:
        print(f"generating the built-in sample set into {root} ...", file=sys.stderr)
    for split in ("train", "val"):  # an older or half-written set: its files must not mix in
        shutil.rmtree(root / split, ignore_errors=True)
    make_sample_set(root, **SAMPLE_PARAMS)
    write_json(root / SAMPLE_MARKER, marker)


def build(cfg: PrepConfig, *, on_shard: Callable[[str, int], None] | None = None) -> dict:
    """Build (or resume, or reuse) the records described by ``cfg``; returns a summary dict.

    ``on_shard(split, index)`` is called in this process after each finished shard (tests use
    it to interrupt a build). Raises PrepError / SourceError with a one-line message.
    """
    t0 = time.perf_counter()
    if cfg.ffcv and importlib.util.find_spec("ffcv") is None:
        raise PrepError("--ffcv needs the ffcv package (pip install '.[ffcv]'; see scripts/setup.sh)")
    source = Path(cfg.source) if cfg.source else DEFAULT_SAMPLE
    out = Path(cfg.out) if cfg.out else DEFAULT_RECORDS
    if cfg.source is None:
        ensure_sample(source, cfg.progress)
    if cfg.repair and not source.is_dir() and _built_from(out, source):
        with locked_out(out):   # the source is gone: only the statistics can be recomputed (from the records)
            fixed = statistics_from_records(out, cfg.workers or usable_cores(), cfg.progress,
                                            lambda line: print(line, flush=True))
            return {**_summary(out, reused=not fixed, written=0, seconds=time.perf_counter() - t0, ffcv=[]),
                    "warnings": []}
    src = scan(source, cfg.val_labels, cfg.val_fraction)
    names = names_of(src.classes, _class_names(cfg, source))
    identity = {"source": str(source.resolve()), "params": params_of(cfg, src)}
    tasks = plan(src, cfg, out)
    warnings = [] if src.val or cfg.val_fraction else [
        f"{source} has no val/ folder: 0 val records, and training needs some; rebuild with --val-fraction 0.1 "
        "(and --overwrite) to hold out a tenth of every class of train/"]
    with locked_out(out):
        if prepare_out(out, identity, cfg.overwrite, cfg.repair):
            _update_names(out, names, warnings)
            if cfg.repair:
                _repair_keys(out, tasks)
            t_run = time.perf_counter()
            say = lambda line: print(line, flush=True)  # noqa: E731
            written = repair(out, tasks, cfg.workers or usable_cores(), cfg.progress, say) if cfg.repair else 0
            fixed = cfg.repair and repair_statistics(out, tasks, cfg.workers or usable_cores(), cfg.progress, say)
            rate = written / max(time.perf_counter() - t_run, 1e-9)
            ffcv = _maybe_ffcv(cfg, out, src, tasks)
            return {**_summary(out, reused=not (written or fixed), written=written, seconds=time.perf_counter() - t0,
                               ffcv=ffcv, rate=rate), "warnings": warnings}
        for split in ("train", "val"):
            (out / split).mkdir(parents=True, exist_ok=True)
            (out / PARTIAL / split).mkdir(parents=True, exist_ok=True)
        write_json(out / PARTIAL / "identity.json", identity)
        clean_stale(out, {f"{t.split}/{t.name}" for t in tasks})
        todo = [t for t in tasks if not shard_done(out, t)]
        workers = min(cfg.workers or usable_cores(), max(len(todo), 1))
        t_run = time.perf_counter()
        try:
            run_tasks(todo, workers, cfg.progress, on_shard)
        except BaseException:  # Ctrl-C, a dead or failing worker: every worker is stopped by now
            with contextlib.suppress(OSError):  # keep the original error if OUT itself went bad
                remove_temp_files(out)  # what they were writing; their finished shards stay
            raise
        run_s = time.perf_counter() - t_run
        finish(out, src, identity, collect(out, tasks, src), tasks, names)
        written = sum(len(t.items) for t in todo)
        ffcv = _maybe_ffcv(cfg, out, src, tasks)
        return {**_summary(out, reused=False, written=written, seconds=time.perf_counter() - t0, ffcv=ffcv,
                           rate=written / run_s if run_s > 0 else 0.0), "warnings": warnings}


def _built_from(out: Path, source: Path) -> bool:
    """True where OUT holds a finished build whose meta.json names ``source``."""
    try:
        return json.loads((out / "meta.json").read_text())["source"] == str(source.resolve())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _class_names(cfg: PrepConfig, source: Path) -> dict[str, str]:
    """--class-names, else SOURCE/LOC_synset_mapping.txt where it exists, else none."""
    if cfg.class_names:
        return read_class_names(Path(cfg.class_names))
    auto = source / SYNSET_MAPPING
    return read_class_names(auto) if auto.is_file() else {}


def _update_names(out: Path, names: dict[str, str], warnings: list[str]) -> None:
    """A finished build given other class names: meta.json gets them (names change no record)."""
    meta = json.loads((out / "meta.json").read_text())
    if names and meta.get("names") != names:
        write_json(out / "meta.json", {**meta, "names": names})
        warnings.append(f"class names updated in {out / 'meta.json'}")


def _repair_keys(out: Path, tasks: list[ShardTask]) -> None:
    """keys.tsv of a finished build rewritten where lost (they follow from the plan and skipped.json)."""
    meta = json.loads((out / "meta.json").read_text())
    if "keys" in meta and not all((out / rel).is_file() for rel in meta["keys"].values()):
        write_keys(out, tasks, json.loads((out / "skipped.json").read_text()))
        print(f"repaired: {out}/*/{KEYS_FILE}", flush=True)


def _maybe_ffcv(cfg: PrepConfig, out: Path, src: Source, tasks: list[ShardTask]) -> list[str]:
    if not cfg.ffcv:
        return []
    from prep.ffcv_writer import write_betons
    return write_betons(out, src.root, tasks, cfg.quality, cfg.workers or usable_cores())


# ---------------------------------------------------------------- CLI

def print_summary(summary: dict) -> None:
    """Counts, skips, throughput and the eigen-colours as rich tables."""
    from rich.table import Table

    from common.console import make_console
    console = make_console()
    t = Table(title=f"records in {summary['out']}" + (" (already complete, reused)" if summary["reused"] else ""))
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("classes (named)", f"{summary['classes']} ({summary['named']})")
    for split in ("train", "val"):
        t.add_row(f"{split} records / shards", f"{summary['counts'][split]} / {summary['shards'][split]}")
    t.add_row("skipped inputs (skipped.json)", str(summary["skipped"]))
    t.add_row("images processed this run", str(summary["images_processed"]))
    t.add_row("throughput", f"{summary['images_per_s']:.0f} img/s")
    t.add_row("wall time", f"{summary['seconds']:.1f} s")
    for path in summary["ffcv"]:
        t.add_row("FFCV", path)
    console.print(t)
    for s in summary["skipped_files"][:10]:   # soft_wrap: one line each, whatever the width (grep, logs)
        console.print(f"  skipped {s['split']}/{s['path'].split('/', 1)[-1]}: {s['reason']}", soft_wrap=True,
                      markup=False, highlight=False)
    if len(summary["skipped_files"]) > 10:
        console.print(f"  ... and {len(summary['skipped_files']) - 10} more (skipped.json)")
    for line in summary.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {line}", soft_wrap=True, highlight=False)
    for wnid in summary["empty_classes"]:
        console.print(f"[bold yellow]warning:[/] class {wnid} has 0 train images (an empty train/{wnid}/ "
                      "folder is almost always a copying mistake)")
    st = summary["stats"]
    e = Table(title=f"RGB statistics of {st['pixels']:,} train pixels (0-255 scale; λ in 0-255²)")
    for col in ("", "R", "G", "B"):
        e.add_column(col, justify="right")
    e.add_row("mean", *(f"{v:.3f}" for v in st["mean"]))
    e.add_row("std", *(f"{v:.3f}" for v in st["std"]))
    vec = np.asarray(st["eigvec"])
    for i, val in enumerate(st["eigval"]):
        e.add_row(f"eigen-colour {i + 1}: λ={val:.2f}", *(f"{v:+.4f}" for v in vec[:, i]))
    console.print(e)


def main(argv=None) -> int:
    cfg = parse_args(PrepConfig, argv, prog="build_records.py", description=__doc__.splitlines()[0])
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:   # kill, a scheduler's stop: as Ctrl-C
        signal.signal(signal.SIGTERM, raise_stopped)

    def work() -> int:
        try:
            summary = build(cfg)     # an OS failure outside OUT's own checks is one line too
        except Stopped as exc:
            print(f"stopped by {signal.Signals(exc.signum).name}: workers stopped, finished shards are kept; "
                  "rerun the same command to resume", file=sys.stderr)
            return 128 + exc.signum
        if cfg.progress:
            print_summary(summary)
        return 0
    return run_command(work, interrupted="interrupted: finished shards are kept; rerun the same command to resume")


if __name__ == "__main__":
    raise SystemExit(main())
