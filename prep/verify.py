"""Check every record of a records folder: each shard's index against its tar, every JPEG
decoded, every label read.

    python -m prep.verify data/records [--workers N] [--no-progress]

Prints one line per record that fails — ``SHARD KEY: what`` (a JPEG that does not decode, a
.cls that is not a class index of meta.json, a record whose tar header does not match the
index), with the source photo it was made from where the build kept keys.tsv — or per shard
whose index does not match its tar or whose .tar or .idx is missing (``SHARD -: what``); the
other shards are still checked. Then every other file training reads:
stats.json and mean_image.npy (records.folder.statistics_problems) and meta.json against the
shards (record counts, classes), one ``FILE: what`` line each. Exit status:
0 all is good, 1 something failed (repair: the build command plus --repair, which rebuilds the
shards and the statistics files), 2 RECORDS is not a records folder (one line on stderr).

The decoder is PIL (libjpeg); where libturbojpeg is installed, every JPEG is also decoded
with its warnings turned into errors, which catches corrupt data that libjpeg decodes
silently into garbage (for example a run of overwritten bytes in mid-stream). Damage that
leaves a JPEG valid (a few bits flipped inside the coded data can) cannot be seen by a
decoder at all; the CRC-32 of every shard's tar and index, kept in meta.json by the build,
catches any changed byte (the shard is then listed as ``SHARD -: changed since the build``).
A damaged shard is repaired by the build command plus ``--repair``.
"""
from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import run_command
from common.config import check_at_least, parse_args
from common.console import counted
from common.system import usable_cores
from records.folder import file_crc32, read_meta, shard_paths, statistics_problems
from records.format import SPLITS, TAR_BLOCK, RecordsError, build_command
from records.index import header_ok, parse_label, read_index
from records.jpeg import StrictJpeg, jpeg_error
from records.keys import KEYS_FILE, read_keys


@dataclass(frozen=True)
class VerifyConfig:
    records: str = field(metadata={"help": "records folder (prep/build_records.py)", "positional": True})
    workers: int | None = field(default=None, metadata={"help": "processes; default: every usable core"})
    progress: bool = field(default=True, metadata={"help": "progress bar in a terminal (plain lines otherwise)"})

    def __post_init__(self):
        check_at_least(self, ("workers",))


@dataclass(frozen=True)
class ShardResult:
    tar: Path
    records: int
    failures: list[tuple[str, str]]    # (key or "-", what)


def verify_shard(tar: Path, idx: Path, classes: int, crc32: dict | None = None) -> ShardResult:
    """Every record of one shard; never raises for bad data (it is the result). ``crc32``:
    meta.json's checksums of the tar and the index ({"tar": n, "idx": n}), if it has them."""
    if missing := [path.name for path in (tar, idx) if not path.is_file()]:
        what = " and ".join(missing) + (" (its DALI index)" if missing == [idx.name] else "")
        return ShardResult(tar, 0, [("-", f"missing {what}")])
    failures = []
    for path, kind in ((tar, "tar"), (idx, "idx")):
        if crc32 and (crc := file_crc32(path)) != crc32[kind]:
            failures.append(("-", f"changed since the build: CRC-32 of {path.name} is {crc:08x}, "
                                  f"meta.json says {crc32[kind]:08x}"))
    try:
        index = read_index(tar, idx)
    except RecordsError as exc:
        return ShardResult(tar, 0, [*failures, ("-", _reason(str(exc), tar, idx))])
    with open(tar, "rb") as fh:
        for key, (jo, js), (co, cs) in zip(index.keys, index.jpg, index.cls):
            key = key.decode(errors="replace")
            fh.seek(int(jo) - TAR_BLOCK)
            jpg_header, jpeg = fh.read(TAR_BLOCK), fh.read(int(js))
            fh.seek(int(co) - TAR_BLOCK)
            cls_header, label = fh.read(TAR_BLOCK), fh.read(int(cs))
            if not (header_ok(jpg_header, f"{key}.jpg".encode(), int(js))
                    and header_ok(cls_header, f"{key}.cls".encode(), int(cs))):
                failures.append((key, "the tar header does not match the index"))
                continue
            try:
                ok = parse_label(label) < classes
            except ValueError:
                ok = False
            if not ok:
                failures.append((key, f"bad .cls {label[:20]!r} (not a class index 0..{classes - 1})"))
            if why := jpeg_error(jpeg):
                failures.append((key, why))
    return ShardResult(tar, len(index), failures)


def _reason(message: str, tar: Path, idx: Path) -> str:
    """read_index's one line without the leading path where it is the shard's tar (the report's
    line starts with it already); the index's problem keeps the .idx's name."""
    for path, name in ((tar, ""), (idx, f"{idx.name}: ")):
        if message.startswith(prefix := f"{path}: "):
            return name + message[len(prefix):]
    return message


def _shards(records: Path) -> tuple[list[tuple[Path, Path, dict | None]], dict]:
    """(tar, idx, meta.json's checksums of both or None) of every shard meta.json lists, its
    files there or not; meta.json."""
    meta = read_meta(records)
    sums = meta.get("crc32") or {}

    def crc(tar: Path, idx: Path) -> dict | None:
        names = (tar.relative_to(records).as_posix(), idx.relative_to(records).as_posix())
        return {"tar": sums[names[0]], "idx": sums[names[1]]} if all(n in sums for n in names) else None

    shards = [(tar, idx, crc(tar, idx)) for split in SPLITS
              for tar, idx in shard_paths(records, split, missing_ok=True)]
    return shards, meta


def verify(cfg: VerifyConfig, out=None) -> int:
    """Check every shard over ``workers`` processes; print failures as they come; exit status."""
    out = out or sys.stdout
    records = Path(cfg.records)
    shards, meta = _shards(records)
    classes = len(meta["classes"])
    workers = min(cfg.workers or usable_cores(), len(shards))
    tty = cfg.progress and out.isatty()
    strict = StrictJpeg().available
    say = (lambda line: progress.console.print(line, markup=False, highlight=False)) if tty \
        else (lambda line: print(line, file=out, flush=True))
    progress = _bar() if tty else None
    total = bad_records = bad_shards = done = 0
    found = {split: 0 for split in SPLITS}          # records per split in the indexes that could be read
    photos, files = {}, []                          # {split: {key: (shard, source path)}} from keys.tsv
    for split in SPLITS:
        try:
            photos[split] = read_keys(records, split)
        except RecordsError as exc:
            files.append((records / split / KEYS_FILE, _reason(str(exc), records / split / KEYS_FILE, records)))
    broken = set()                                  # splits with a shard that could not be read
    with ProcessPoolExecutor(max(workers, 1)) as pool, (progress or _nothing()):
        task = progress.add_task("verify", total=len(shards)) if progress else None
        jobs = [pool.submit(verify_shard, tar, idx, classes, crc) for tar, idx, crc in shards]
        for job in jobs:                     # in shard order, so the report reads in order
            result = job.result()
            shard_level = sum(key == "-" for key, _ in result.failures)
            total, done = total + result.records, done + 1
            split = result.tar.parent.name
            found[split] += result.records
            if shard_level:
                broken.add(split)
            bad_records += len(result.failures) - shard_level
            bad_shards += shard_level > 0
            for key, why in result.failures:
                photo = photos.get(split, {}).get(key)
                say(f"{result.tar} {key}: {why}" + (f" (photo: {photo[1]})" if photo else ""))
            if progress:
                progress.advance(task)
            elif cfg.progress and (done % max(1, len(shards) // 20) == 0 or done == len(shards)):
                say(f"verify: {done}/{len(shards)} shards, {total} records, {bad_records} bad, "
                    f"{bad_shards} bad shards")
    files += statistics_problems(records, meta)
    for split in SPLITS:
        if split in (meta.get("keys") or {}) and split not in broken and len(photos[split]) != meta["counts"][split]:
            files.append((records / split / KEYS_FILE, f"lists {len(photos[split])} records, meta.json counts "
                                                       f"{meta['counts'][split]}"))
    for split in SPLITS:
        if split not in broken and found[split] != meta["counts"][split]:
            files.append((records / "meta.json", f"counts {split} records {meta['counts'][split]}, "
                                                 f"but its {split} shards hold {found[split]}"))
    if not isinstance(meta["classes"], list) or not meta["classes"] or \
            len(set(map(str, meta["classes"]))) != len(meta["classes"]):
        files.append((records / "meta.json", "classes is not a list of distinct class names"))
    for path, why in files:
        say(f"{path}: {why}")
    checked = sum(crc is not None for _, _, crc in shards)
    failed = bad_records + bad_shards + len(files)
    say(f"verify: {total} records in {len(shards)} shards: {counted(bad_records, 'bad record')}, "
        f"{counted(bad_shards, 'bad shard')}, {counted(len(files), 'bad statistics/meta file')} "
        f"(decoder: PIL{' + strict libturbojpeg' if strict else '; libturbojpeg not found'}; "
        + (f"checksums of {checked} shards)" if checked else "no checksums: records built before they were kept)"))
    if failed and checked or files and not (bad_records or bad_shards):
        say("verify: repair (it rebuilds exactly the damaged shards, byte for byte, and the statistics files), "
            "then resume training: "
            + build_command(str(records), meta["source"], meta["params"], "--repair"))
    elif failed:
        say("verify: these records predate the shard checksums: delete the .tar and .idx of each shard listed, "
            "then run the build command plus --repair (it rebuilds the missing shards), then resume training")
    return 1 if failed else 0


def _bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(VerifyConfig, argv, prog="python -m prep.verify", description=__doc__.split("\n\n")[0])
    return run_command(lambda: verify(cfg))


if __name__ == "__main__":
    sys.exit(main())
