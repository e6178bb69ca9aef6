"""A build left alone: killed or stopped builds leave no worker and no lock behind, a rerun
ends with exactly the uninterrupted tree; every file training reads is checked by prep.verify
and rebuilt by --repair; class names, the key -> photo list, a held-out val part of train/."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prep.build_records import PrepConfig, build
from prep.sample import make_sample_set

REPO = Path(__file__).resolve().parent.parent
BUILD = [sys.executable, str(REPO / "prep" / "build_records.py")]


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every file of a records folder (lock file left out); meta's source path dropped."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != ".build.lock"}
    meta = json.loads(files["meta.json"])
    meta.pop("source")
    files["meta.json"] = json.dumps(meta).encode()
    return files


def cfg(src, out, **kw) -> PrepConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 5)
    return PrepConfig(source=str(src), out=str(out), **kw)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unattended_src")
    make_sample_set(root, classes=3, train_per_class=8, val_per_class=3, seed=1, workers=1)
    return root


@pytest.fixture(scope="module")
def records(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unattended_rec") / "out"
    build(cfg(src, out))
    return out


def argv(src: Path, out: Path, workers: int = 2) -> list[str]:
    return ["--source", str(src), "--out", str(out), "--shard-size", "5", "--workers", str(workers),
            "--no-progress"]


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (a /proc scan)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# The CLI with every worker stuck in its first train shard (after one record): the parent is
# then killed from outside while both workers are busy.
STUCK_CLI = """
import os, sys, time
sys.path.insert(0, {repo!r})
from prep import build_records, shards
real_add = shards.ShardWriter.add

def add(self, *args):
    real_add(self, *args)
    if self.tar_path.parent.name == "train":
        open(os.path.join({busy!r}, str(os.getpid())), "w").close()
        time.sleep(600)

shards.ShardWriter.add = add
sys.exit(build_records.main(sys.argv[1:]))
"""

linux_fork = pytest.mark.skipif(not sys.platform.startswith("linux") or multiprocessing.get_start_method() != "fork",
                                reason="the fault is planted in forked workers; /proc is read")


@linux_fork
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_parent_leaves_no_worker_and_the_rerun_completes(src, records, tmp_path, sig):
    out, busy = tmp_path / "out", tmp_path / "busy"
    busy.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", STUCK_CLI.format(repo=str(REPO), busy=str(busy)), *argv(src, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(busy.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = children(proc.pid)
        assert len(workers) >= 2 and len(list(busy.iterdir())) == 2, proc.stderr.read() if proc.poll() else ""
        os.kill(proc.pid, sig)                       # the parent only, as `kill PID` does
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if alive(w)], "workers outlived the build"
    finally:
        try:                                         # whatever is left of that build (a failed test)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.strip() == ("stopped by SIGTERM: workers stopped, finished shards are kept; "
                               "rerun the same command to resume"), err
    else:
        assert proc.returncode == -signal.SIGKILL
    rerun = subprocess.run([*BUILD, *argv(src, out)], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_bytes(out) == tree_bytes(records)


def test_a_lock_held_by_orphans_of_a_dead_build_is_taken_over(src, records, tmp_path):
    """A lock file flocked by a process that did not take it (as workers of an older build
    inherited it), its recorded owner gone: the rerun takes it over with one line."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"pid": int(dead.stdout), "host": os.uname().nodename, "proc_start": "1", "started": "then"}
    (out / ".build.lock").write_text(json.dumps(owner))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(out / '.build.lock')!r}, os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rerun = subprocess.run([*BUILD, *argv(src, out, workers=1)], capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.count("\n") == 1 and "taking over the lock of pid " + str(owner["pid"]) in rerun.stderr, \
        rerun.stderr
    assert tree_bytes(out) == tree_bytes(records)


def test_a_lock_held_by_a_live_build_names_it(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    from common.atomic import lock_folder, unlock_folder
    fd = lock_folder(out / ".build.lock")
    try:
        rerun = subprocess.run([*BUILD, *argv(src, out, workers=1)], capture_output=True, text=True, timeout=120)
    finally:
        unlock_folder(fd)
    assert rerun.returncode == 2
    assert f"is held by pid {os.getpid()} on {os.uname().nodename}, since " in rerun.stderr, rerun.stderr


# The CLI killed right after it wrote meta.json (the completion mark), before it removed .partial/.
KILLED_AFTER_META = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from prep import build_records, finish
real = finish.write_json

def write_json(path, obj):
    real(path, obj)
    if os.path.basename(path) == "meta.json":
        os.kill(os.getpid(), signal.SIGKILL)

finish.write_json = write_json
sys.exit(build_records.main(sys.argv[1:]))
"""


def test_kill_right_after_meta_json_then_rerun_is_the_uninterrupted_tree(src, records, tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_META.format(repo=str(REPO)), *argv(src, out, 1)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "meta.json").is_file() and (out / ".partial").is_dir()
    rerun = subprocess.run([*BUILD, *argv(src, out, 1)], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert not (out / ".partial").exists()
    assert tree_bytes(out) == tree_bytes(records)


# ---------------------------------------------------------------- verify: every file training reads

def _verify(out: Path) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "prep.verify", str(out), "--workers", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    return run.returncode, run.stdout + run.stderr


def _stats_edit(key, change):
    def edit(out: Path) -> None:
        stats = json.loads((out / "stats.json").read_text())
        if change is None:
            del stats[key]
        else:
            stats[key] = change(np.asarray(stats[key])).tolist()
        (out / "stats.json").write_text(json.dumps(stats))
    return edit


def _mean_edit(change):
    def edit(out: Path) -> None:
        np.save(out / "mean_image.npy", change(np.load(out / "mean_image.npy")))
    return edit


DAMAGE = {
    "stats-deleted": (lambda out: (out / "stats.json").unlink(), "stats.json: missing"),
    "no-eigvec": (_stats_edit("eigvec", None), "stats.json: missing field 'eigvec'"),
    "eigvec-not-orthonormal": (_stats_edit("eigvec", lambda v: v * [1, 2, 1]), "eigvec is not orthonormal"),
    "eigval-ascending": (_stats_edit("eigval", lambda v: v[::-1]), "is not descending"),
    "eigval-nan": (_stats_edit("eigval", lambda v: v * np.nan), "field 'eigval' must be finite"),
    "mean-off": (_stats_edit("mean", lambda v: v + 1), "is not stats.json's mean"),
    "mean-image-deleted": (lambda out: (out / "mean_image.npy").unlink(), "mean_image.npy: missing"),
    "mean-image-float32": (_mean_edit(lambda a: a.astype(np.float32)), "expected float64"),
    "mean-image-shifted": (_mean_edit(lambda a: a + 0.5), "is not stats.json's mean"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_a_damaged_statistics_file_and_repair_rebuilds_it(records, tmp_path, damage):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(records, out)
    good = tree_bytes(out)
    edit, expected = DAMAGE[damage]
    edit(out)
    status, text = _verify(out)
    assert status == 1, text
    assert expected in text, text
    assert "--repair" in text.splitlines()[-1], text
    src = json.loads((out / "meta.json").read_text())["source"]
    plain = subprocess.run([*BUILD, *argv(Path(src), out, 1)], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "--repair" in plain.stderr, plain.stderr
    fixed = subprocess.run([*BUILD, *argv(Path(src), out, 1), "--repair"], capture_output=True, text=True,
                           timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert "recomputed from the source photos" in fixed.stdout, fixed.stdout
    assert tree_bytes(out) == good
    assert _verify(out)[0] == 0


def test_verify_finds_meta_counts_that_disagree_with_the_shards(records, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(records, out)
    meta = json.loads((out / "meta.json").read_text())
    meta["counts"]["val"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    status, text = _verify(out)
    assert status == 1 and f"meta.json: counts val records {meta['counts']['val']}, but its val shards hold " \
        f"{meta['counts']['val'] - 1}" in text, text


# ---------------------------------------------------------------- names, keys, a held-out val part

def _read_tar(out: Path, shard: str, key: str) -> tuple[bytes, int]:
    import tarfile
    with tarfile.open(out / shard) as tar:
        return tar.extractfile(f"{key}.jpg").read(), int(tar.extractfile(f"{key}.cls").read())


def test_keys_tsv_maps_every_record_to_its_source_photo(photo_source, tmp_path):
    """Every record's key names the photo it was made from: decoding that photo with the
    build's own transform gives the record's pixels (up to the JPEG encoding)."""
    from prep import transform
    from records.folder import read_meta, shard_paths
    from records.index import read_index
    from records.keys import read_keys
    out = tmp_path / "out"
    build(cfg(photo_source, out))
    meta = read_meta(out)
    skipped = {s["path"] for s in json.loads((out / "skipped.json").read_text())}
    for split in ("train", "val"):
        keys = read_keys(out, split)
        records = [(tar, k.decode()) for tar, idx in shard_paths(out, split) for k in read_index(tar, idx).keys]
        assert sorted(keys) == sorted(k for _, k in records) and len(keys) == meta["counts"][split]
        for tar, key in records:
            shard, rel = keys[key]
            assert shard == tar.stem and rel not in skipped
            jpeg, label = _read_tar(out, f"{split}/{shard}.tar", key)
            assert meta["classes"][label] == rel.split("/")[1]
            want = transform.decode_record((photo_source / rel).read_bytes()).astype(int)
            got = transform.decode_record(jpeg).astype(int)
            assert np.abs(got - want).mean() < 4, (key, rel)


def test_keys_tsv_escapes_tabs_and_newlines_in_file_names(src, tmp_path):
    import shutil
    from records.keys import read_keys
    source = tmp_path / "src"
    shutil.copytree(src, source)
    first = sorted((source / "train").iterdir())[0]
    photo = next(p for p in sorted(first.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg"))
    odd = photo.with_name("a\tb\nc\\d.JPEG")
    photo.rename(odd)
    out = tmp_path / "out"
    build(cfg(source, out))
    paths = [rel for _, rel in {**read_keys(out, "train"), **read_keys(out, "val")}.values()]
    assert f"train/{first.name}/a\tb\nc\\d.JPEG" in paths
    assert all(len(line.split("\t")) == 3 for line in (out / "train" / "keys.tsv").read_text().splitlines())


def test_a_class_folder_name_with_a_control_character_is_refused_in_one_line(src, tmp_path):
    import shutil
    source = tmp_path / "src"
    shutil.copytree(src, source)
    wnid = sorted(p.name for p in (source / "train").iterdir())[0]
    for split in ("train", "val"):                 # accepted silently before: predict printed it on two lines
        (source / split / wnid).rename(source / split / "n0\nbad")
    run = subprocess.run([*BUILD, *argv(source, tmp_path / "out", 1)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "class folder 'n0\\nbad' has a control character ('\\n')" in run.stderr
    assert not (tmp_path / "out").exists()


def _names_file(path: Path, classes: list[str]) -> Path:
    path.write_text("".join(f"{w} name of {w}, Latin {i}\n" for i, w in enumerate(classes[:-1])))
    return path


def test_class_names_from_a_file_or_from_source(src, records, tmp_path):
    import shutil
    from records.folder import class_names, read_meta
    classes = read_meta(records)["classes"]
    out = tmp_path / "out"
    build(cfg(src, out, class_names=str(_names_file(tmp_path / "names.txt", classes))))
    named = class_names(read_meta(out))
    assert named == {**{w: f"name of {w}, Latin {i}" for i, w in enumerate(classes[:-1])}, classes[-1]: classes[-1]}
    assert class_names(read_meta(records)) == {w: w for w in classes}   # none given: the wnids
    shards = {n: b for n, b in tree_bytes(out).items() if n != "meta.json"}
    (tmp_path / "other.txt").write_text(f"{classes[0]} another name\n")
    again = build(cfg(src, out, class_names=str(tmp_path / "other.txt")))   # names alone: meta.json updated
    assert again["reused"] and class_names(read_meta(out))[classes[0]] == "another name"
    assert {n: b for n, b in tree_bytes(out).items() if n != "meta.json"} == shards
    source = tmp_path / "src"
    shutil.copytree(src, source)
    _names_file(source / "LOC_synset_mapping.txt", classes)             # ImageNet's file, read by itself
    build(cfg(source, tmp_path / "auto"))
    assert class_names(read_meta(tmp_path / "auto")) == named
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{classes[0]}\n")
    run = subprocess.run([*BUILD, *argv(src, tmp_path / "o2", 1), "--class-names", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"error: --class-names {bad}:1: expected 'wnid name', " \
        f"got {classes[0]!r}", run.stderr


def test_val_fraction_holds_out_a_part_of_every_class(src, tmp_path):
    import shutil
    from records.folder import read_meta
    from records.keys import read_keys
    source = tmp_path / "src"
    shutil.copytree(src, source)
    shutil.rmtree(source / "val")
    run = subprocess.run([*BUILD, "--source", str(source), "--out", str(tmp_path / "none"), "--workers", "1"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert run.returncode == 0 and "has no val/ folder: 0 val records" in run.stdout and "--val-fraction" in run.stdout
    per_class = {d.name: sorted(f"train/{d.name}/{p.name}" for p in d.iterdir() if not p.name.startswith("."))
                 for d in (source / "train").iterdir()}
    got = []
    for seed, out in ((0, tmp_path / "a"), (5, tmp_path / "b")):
        build(cfg(source, out, val_fraction=0.25, seed=seed))
        skipped = {s["path"] for s in json.loads((out / "skipped.json").read_text())}
        train = {rel for _, rel in read_keys(out, "train").values()}
        val = {rel for _, rel in read_keys(out, "val").values()}
        assert not train & val and train | val | skipped == {r for rels in per_class.values() for r in rels}
        for wnid, rels in per_class.items():   # round(0.25 x files) of every class held out (undecodable ones skipped)
            held = {r for r in rels if _held(r, rels, 0.25)}
            assert len(held) == int(0.25 * len(rels) + 0.5) > 0 and held - skipped == val & set(rels), wnid
        meta = read_meta(out)
        assert meta["counts"]["val"] == len(val) and meta["params"]["val_fraction"] == 0.25
        got.append(val)
    assert got[0] == got[1]                     # the same photos whatever the seed
    with pytest.raises(Exception, match="--val-fraction: .*val exists"):
        build(cfg(src, tmp_path / "c", val_fraction=0.1))


def _held(rel: str, rels: list[str], fraction: float) -> bool:
    """The independent rule: the round(fraction x n) paths of a class with the smallest SHA-256."""
    import hashlib
    k = int(fraction * len(rels) + 0.5)
    return rel in sorted(rels, key=lambda r: hashlib.sha256(r.encode()).digest())[:k]


def test_repair_without_the_source_recomputes_the_statistics_from_the_records(photo_source, tmp_path):
    """The source gone: --repair recomputes the statistics from the records' JPEGs and says so;
    they differ from the build's (pixels summed before JPEG encoding) by JPEG noise only."""
    import shutil
    from records.folder import read_stats
    source, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(photo_source, source)
    build(cfg(source, out))
    good, good_mean = read_stats(out), np.load(out / "mean_image.npy")
    shutil.rmtree(source)
    (out / "stats.json").unlink()
    (out / "mean_image.npy").unlink()
    run = subprocess.run([*BUILD, *argv(source, out, 1), "--repair"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "recomputed from the records' JPEGs, as the source is gone" in run.stdout, run.stdout
    got = read_stats(out)
    assert got.pixels == good.pixels
    assert np.abs(got.mean - good.mean).max() < 1.0 and np.abs(got.eigval - good.eigval).max() < 0.05 * good.eigval[0]
    assert np.abs(np.load(out / "mean_image.npy") - good_mean).mean() < 1.0
    assert _verify(out)[0] == 0
    (out / "train" / "shard-000000.tar").unlink()          # a shard cannot come back without the source
    run = subprocess.run([*BUILD, *argv(source, out, 1), "--repair"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is gone, so shards cannot be rebuilt" in run.stderr
