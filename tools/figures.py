"""Pictures of a run: training curves, the paper's Figure 3 (conv1 kernels) and Figure 4 (neighbours).

    python -m tools.figures RUN_DIR [--checkpoint best.pt] [--records DIR] [--only curves,conv1]

writes into RUN_DIR:
- ``curves.png``: train loss and train/val top-1 and top-5 error per epoch, lr drops marked;
  reads ``metrics.jsonl``, so it works while the run is going (the file grows one line per epoch).
- ``conv1.png`` + ``conv1.json``: the conv1 kernels, tower 0's in the upper block and tower 1's in
  the lower (one block for the single-tower net), each kernel contrast-stretched on its own; and
  per tower the colour share of the kernels' energy (``colour_share``).
- ``neighbours.png`` + ``neighbours.json``: a few validation images (first column), each followed
  by the training images whose fc7 features (the last hidden layer, 4096-d) are nearest in
  Euclidean distance, centre view; a green frame = same class as the query, red = another class.
  Under each row the query's class name and its source photo; ``neighbours.json`` names every
  image's class and photo (from the records' ``<split>/keys.tsv``; records built before it was
  written give record keys only, said once).

Every PNG carries a caption line (the checkpoint, its epoch and step, the net's towers; for
``curves.png`` the run, its last epoch and step), drawn at the top and stored as the PNG's
``Description`` text.

Exit status: 0 done, 2 bad input (one ``error:`` line). The image grids are drawn with numpy +
Pillow (exact pixel sizes, no plotting library needed); the curves with matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from common.atomic import atomic_open, write_json
from common.charts import pyplot, save_figure
from common.cli import run_command
from common.config import ConfigError, Parser, check_at_least
from common.errors import UserError
from model.kernels import BACKGROUND, conv1_kernels, kernel_grid
from pipeline import Loader, LoaderOptions, reference
from records.folder import class_names, read_meta, shard_paths
from records.keys import KEYS_FILE, read_keys

from tools import weights
from engine.report import Reporter

FIGURES = ("curves", "conv1", "neighbours")
CURVES_SIZE = (10, 4)        # inches at common.charts.DPI (100): 1000 x 400 pixels

# neighbours.png geometry (pixels)
THUMB = 112                  # each 256x256 record image shown at 112x112
THUMB_GAP = 4                # between images and around the grid
QUERY_GAP = 16               # extra space between the query column and its neighbours
FRAME = 4                    # the class frame drawn inside each neighbour's cell
LABEL = 16                   # the text line under each neighbours row (query's class and photo)
CAPTION = 20                 # the caption line on top of conv1.png and neighbours.png
INK = (0, 0, 0)


class FiguresError(UserError):
    """A run folder or option problem; one line."""


# --- curves -------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts; a last line that does not parse (a run writing it) is
    ignored, an unparsable line before it is an error."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise FiguresError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def lr_drops(metrics: list[dict]) -> list[tuple[int, float]]:
    """(epoch index the new lr started after, new lr) for every epoch whose lr is lower than the last's.

    Each metrics line's ``lr`` is the schedule's lr during that epoch, so a drop decided after
    epoch k shows as a lower lr on line k + 1; the line is drawn at x = k, the boundary."""
    return [(prev["epoch"], cur["lr"]) for prev, cur in zip(metrics, metrics[1:]) if cur["lr"] < prev["lr"]]


def plot_curves(metrics: list[dict], path: Path, title: str = "") -> None:
    """Two panels: train loss; top-1 and top-5 error (train and validation, in %), per epoch;
    ``title``: the caption line (on top, and the PNG's Description)."""
    plt = pyplot()
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=CURVES_SIZE, layout="constrained")
    epochs = [m["epoch"] for m in metrics]

    def series(key: str) -> list[float]:
        return [m.get(key, math.nan) for m in metrics]

    loss_ax.plot(epochs, series("train_loss"), "o-", label="train loss")
    if any("val_loss" in m for m in metrics):
        loss_ax.plot(epochs, series("val_loss"), "o--", label="val loss (centre)")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, style, label in (("train_top1_err", "o-", "train top-1"), ("val_top1_err", "s-", "val top-1"),
                              ("train_top5_err", "o:", "train top-5"), ("val_top5_err", "s:", "val top-5")):
        err_ax.plot(epochs, [100 * v for v in series(key)], style, label=label)
    err_ax.set(xlabel="epoch", ylabel="error (%)", title="error (val: centre crop)", ylim=(0, 100))
    for ax in (loss_ax, err_ax):
        for epoch, lr in lr_drops(metrics):
            ax.axvline(epoch, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"lr {lr:.3g}", (epoch, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path, {"Description": title} if title else None)


def curves_caption(run_dir: Path, metrics: list[dict]) -> str:
    """``RUN · metrics.jsonl to epoch 3, step 6 · 2 towers`` (towers from the run's config.json)."""
    last = metrics[-1]
    parts = [run_dir.name or str(run_dir), f"metrics.jsonl to epoch {last.get('epoch')}, step {last.get('step')}"]
    try:
        towers = json.loads((run_dir / "config.json").read_text()).get("towers")
    except (OSError, ValueError, AttributeError):
        towers = None
    if isinstance(towers, int):
        parts.append(counted_towers(towers))
    return " · ".join(parts)


def counted_towers(n: int) -> str:
    return f"{n} tower" + ("" if n == 1 else "s")


def checkpoint_caption(trained: weights.Trained) -> str:
    """``RUN/best.pt · epoch 3, step 6 · 2 towers``: which weights a picture shows."""
    src = trained.source
    return (f"{src.parent.name}/{src.name} · epoch {trained.epoch}, step {trained.step} · "
            f"{counted_towers(trained.net.cfg.towers)}")


def text_strip(text: str, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): ``text`` in black on the figures' white, one line, left-aligned
    (cut at the right edge where longer than the picture is wide)."""
    strip = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    top = draw.textbbox((0, 0), text, font=font)
    draw.text((THUMB_GAP, (height - (top[3] - top[1])) // 2 - top[1]), text, fill=INK, font=font)
    return np.asarray(strip)


def with_caption(grid: np.ndarray, caption: str) -> np.ndarray:
    """The caption line on top of an image grid."""
    return np.concatenate([text_strip(caption, grid.shape[1], CAPTION), grid])


# --- conv1 (the paper's Figure 3) -----------------------------------------------------------

def colour_share(kernels: np.ndarray) -> np.ndarray:
    """Per kernel, the share of its energy (sum of squared weights) that is not grey.

    Each kernel pixel's RGB weight vector w splits orthogonally into its grey part, the
    projection onto (1, 1, 1) (every channel = the mean of the three), and the rest;
    share = |rest|^2 / |w|^2 summed over the kernel's pixels. 0 for a kernel that sees only
    luminance (equal weights on R, G, B), 1 for one blind to luminance; random i.i.d. weights
    give 2/3 on average. The paper saw tower 0's kernels come out "largely colour-agnostic".
    """
    k = np.asarray(kernels, np.float64)
    grey = k.mean(axis=1, keepdims=True)
    total = (k ** 2).sum(axis=(1, 2, 3))
    rest = ((k - grey) ** 2).sum(axis=(1, 2, 3))
    return np.divide(rest, total, out=np.zeros_like(total), where=total > 0)


def conv1_figure(net, out: Path, caption: str | None = None) -> dict:
    """Write conv1.png (``caption`` on top where given) and conv1.json; return the colour-share
    summary."""
    towers = conv1_kernels(net)
    grid = kernel_grid(towers)
    save_png(with_caption(grid, caption) if caption else grid, out / "conv1.png", caption)
    shares = [colour_share(t) for t in towers]
    summary = {"colour_share": [float(s.mean()) for s in shares],
               "kernels": [[round(float(v), 4) for v in s] for s in shares],
               "meaning": "per tower, the mean over its conv1 kernels of the share of each kernel's "
                          "energy not in its grey (R=G=B) component: 0 = colour-agnostic; random = 2/3"}
    write_json(out / "conv1.json", summary)
    return summary


# --- neighbours (the paper's Figure 4) --------------------------------------------------------

@torch.no_grad()
def fc7(net, images: torch.Tensor) -> torch.Tensor:
    """The last hidden layer (fc7, after its ReLU; no dropout in eval mode): float32 (B, 4096)."""
    return torch.cat(net.trace(images)["fc7"], dim=1).float()


def fc7_batches(net, loader: Loader):
    """(features (B, 4096), labels (B,), record keys) for each batch of a with_draws Loader."""
    for images, labels, draws in loader:
        yield fc7(net, images.to(net.input_device)), labels.cpu(), draws.keys


@dataclass
class Neighbours:
    distance: np.ndarray         # (Q, k) float64, ascending per row
    keys: list[list[str]]        # (Q, k) record keys of the train split
    labels: np.ndarray           # (Q, k) class indices


def nearest(queries: torch.Tensor, batches, k: int, limit: int | None = None, on_batch=lambda n: None) -> Neighbours:
    """The k base items nearest to each query row (Euclidean), over an iterable of
    (features, labels, keys) batches, keeping only a running top-k: memory O(queries x k), so
    it scans ImageNet's 1.28M training images without holding their 4096-d features."""
    q = queries.float()
    best_d = torch.full((len(q), 0), math.inf, dtype=torch.float64)
    best_keys: list[list[str]] = [[] for _ in range(len(q))]
    best_labels = torch.zeros((len(q), 0), dtype=torch.int64)
    seen = 0
    for feats, labels, keys in batches:
        if limit is not None and seen >= limit:
            break
        # no matrix-product shortcut: exact differences, so an image's distance to itself is 0
        d = torch.cdist(q.to(feats.device), feats, compute_mode="donot_use_mm_for_euclid_dist")
        d = torch.cat([best_d, d.double().cpu()], dim=1)
        cand_keys = [row + list(keys) for row in best_keys]
        cand_labels = torch.cat([best_labels, labels.view(1, -1).expand(len(q), -1)], dim=1)
        top = d.topk(min(k, d.shape[1]), dim=1, largest=False)   # sorted ascending
        best_d, best_labels = top.values, cand_labels.gather(1, top.indices)
        best_keys = [[row[j] for j in idx] for row, idx in zip(cand_keys, top.indices.tolist())]
        seen += len(keys)
        on_batch(len(keys))
    return Neighbours(best_d.numpy(), best_keys, best_labels.numpy())


def pick(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over 0..total-1 (val records are in class order, so
    this picks queries from across the classes)."""
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(min(count, total))})


def query_features(net, loader: Loader, wanted: list[int]):
    """fc7 features, labels and keys of the val records at positions ``wanted`` (in order)."""
    feats, labels, keys, pos = [], [], [], 0
    want = set(wanted)
    for f, lab, ks in fc7_batches(net, loader):
        for j in range(len(ks)):
            if pos + j in want:
                feats.append(f[j]), labels.append(int(lab[j])), keys.append(ks[j])
        pos += len(ks)
        if pos > max(wanted):
            break
    return torch.stack(feats), labels, keys


def record_images(records: Path, split: str, keys: set[str]) -> dict[str, np.ndarray]:
    """The decoded 256x256 record images of ``keys``, read through the DALI index files
    (byte offsets of each member), so only those JPEGs are read, not whole shards."""
    found: dict[str, np.ndarray] = {}
    for tar, idx in shard_paths(records, split):
        for line in idx.read_text().splitlines()[1:]:
            parts = line.split()
            for ext, offset, size, name in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4]):
                key = name.rsplit(".", 1)[0]
                if ext == "jpg" and key in keys and key not in found:
                    with open(tar, "rb") as fh:
                        fh.seek(int(offset))
                        found[key] = reference.decode(fh.read(int(size)))
        if len(found) == len(keys):
            break
    return found


def thumbnail(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((THUMB, THUMB), Image.Resampling.BOX))


def neighbours_grid(query_images: list[np.ndarray], rows: list[list[np.ndarray]],
                    same_class: list[list[bool]], labels: list[str] | None = None) -> np.ndarray:
    """uint8 (H, W, 3): one row per query: the query, a gap, its neighbours (framed green when
    of the query's class, red otherwise); with ``labels``, a text line under each row."""
    k = max(len(r) for r in rows)
    width = (1 + k) * THUMB + (k + 2) * THUMB_GAP + QUERY_GAP
    row_h = THUMB + (LABEL if labels else 0)
    height = len(rows) * row_h + (len(rows) + 1) * THUMB_GAP
    grid = np.full((height, width, 3), BACKGROUND, np.uint8)
    for r, (query, row) in enumerate(zip(query_images, rows)):
        y = THUMB_GAP + r * (row_h + THUMB_GAP)
        grid[y:y + THUMB, THUMB_GAP:THUMB_GAP + THUMB] = thumbnail(query)
        if labels:
            grid[y + THUMB:y + row_h] = text_strip(labels[r], width, LABEL)
        for c, (image, same) in enumerate(zip(row, same_class[r])):
            x = 2 * THUMB_GAP + QUERY_GAP + THUMB + c * (THUMB + THUMB_GAP)
            cell = grid[y:y + THUMB, x:x + THUMB]
            cell[:] = (40, 160, 60) if same else (200, 40, 40)
            cell[FRAME:-FRAME, FRAME:-FRAME] = thumbnail(image)[FRAME:-FRAME, FRAME:-FRAME]
    return grid


@dataclass(frozen=True)
class NeighbourOptions:
    queries: int = 5                 # validation images (the paper's Figure 4 shows 5)
    k: int = 6                       # neighbours each (the paper: 6)
    batch_size: int = 64
    train_limit: int | None = None   # scan at most this many training images (None: all)


def neighbours_figure(trained: weights.Trained, out: Path, device: str, opts: NeighbourOptions,
                      say: Reporter) -> dict:
    net, records = trained.net, trained.records
    if records is None:
        raise FiguresError(f"{trained.source}: an exported file names no records folder; "
                           "neighbours.png needs one (--records DIR)")
    mean = "pixel" if trained.mean.ndim == 3 else "channel"
    with_keys = LoaderOptions(with_draws=True)

    def loader(split: str) -> Loader:
        return Loader(records, split=split, view="center", batch_size=opts.batch_size, device=device,
                      mean=mean, options=with_keys)
    val = loader("val")
    wanted = pick(val.epoch_size, opts.queries)
    q, q_labels, q_keys = query_features(net, val, wanted)
    del val
    train = loader("train")
    total = min(train.epoch_size, opts.train_limit or train.epoch_size)
    with say.bar("fc7 features of the train split", total) as advance:
        found = nearest(q, fc7_batches(net, train), opts.k, opts.train_limit, on_batch=advance)
    val_images = record_images(records, "val", set(q_keys))    # keys repeat across splits
    train_images = record_images(records, "train", {k for row in found.keys for k in row})
    same = [[int(lab) == q_labels[i] for lab in found.labels[i]] for i in range(len(q_keys))]
    photo, traced = photo_finder(records, say)
    names = class_names(read_meta(records))
    wnids = trained.classes

    def name(label: int) -> str:
        return names.get(wnids[label], wnids[label])

    labels = [f"{name(lab)} ({wnids[lab]}): {photo('val', key, full=False) or 'record ' + key}"
              for key, lab in zip(q_keys, q_labels)]
    caption = checkpoint_caption(trained)
    grid = neighbours_grid([val_images[k] for k in q_keys],
                           [[train_images[k] for k in row] for row in found.keys], same, labels)
    save_png(with_caption(grid, caption), out / "neighbours.png", caption)
    summary = {"caption": caption, "feature": "fc7 (4096-d, after ReLU), centre 224 crop, Euclidean",
               "train_images_scanned": total,
               "photos": traced,
               "queries": [{"val_key": key, "label": wnids[lab], "name": name(lab), "photo": photo("val", key),
                            "neighbours": [{"train_key": nk, "label": wnids[int(nl)], "name": name(int(nl)),
                                            "photo": photo("train", nk), "distance": float(d)}
                                           for nk, nl, d in zip(found.keys[i], found.labels[i], found.distance[i])]}
                           for i, (key, lab) in enumerate(zip(q_keys, q_labels))]}
    write_json(out / "neighbours.json", summary)
    return summary


def photo_finder(records: Path, say: Reporter):
    """(photo(split, key, full) -> the source photo of a record or None, a sentence for
    neighbours.json): from the records' keys.tsv, the path joined to the build's source
    folder. Records built before keys.tsv: every photo None, and one line says so."""
    tables = {split: read_keys(records, split) for split in ("train", "val")}
    missing = [split for split, table in tables.items() if not table]
    source = read_meta(records).get("source")
    root = Path(source) if isinstance(source, str) else None
    if missing:
        files = ", ".join(str(records / split / KEYS_FILE) for split in missing)
        say.line(f"figures: {files}: missing (records built before it): neighbours name record keys, not photos; "
                 "the build command plus --repair writes it")
        traced = f"not traced: {files} missing (records built before it)"
    else:
        traced = f"the build's source photos ({records}/<split>/{KEYS_FILE})"

    def photo(split: str, key: str, full: bool = True) -> str | None:
        """The photo's path (``full=False``: relative to the source folder, for the picture)."""
        hit = tables[split].get(key)
        if hit is None:
            return None
        return str(root / hit[1]) if root and full else hit[1]
    return photo, traced


# --- command line -----------------------------------------------------------------------------

def save_png(array: np.ndarray, path: Path, caption: str | None = None) -> None:
    """``array`` as a PNG, written atomically; ``caption`` also as its Description text."""
    info = PngImagePlugin.PngInfo()
    if caption:
        info.add_text("Description", caption)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(array).save(fh, format="PNG", pnginfo=info)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m tools.figures", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder (train.py --out)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint for conv1/neighbours, relative to RUN_DIR or a path (default: best.pt, else last.pt)")
    p.add_argument("--records", default=None, help="records folder (default: the one the run trained on)")
    p.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {', '.join(FIGURES)}")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when a GPU is visible)")
    p.add_argument("--queries", type=int, default=NeighbourOptions.queries, help="validation images in neighbours.png")
    p.add_argument("--neighbours", type=int, default=NeighbourOptions.k, help="training images shown per query")
    p.add_argument("--batch-size", type=int, default=NeighbourOptions.batch_size, help="images per fc7 batch")
    p.add_argument("--train-limit", type=int, default=None, help="scan only the first N training images")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in FIGURES]
    if bad or not only:
        p.error(f"--only takes a subset of {', '.join(FIGURES)}; got {args.only!r}")
    try:
        check_at_least(args, ("queries", "neighbours", "batch_size", "train_limit"))
    except ConfigError as exc:
        p.error(str(exc))
    args.only = only
    return args


def checkpoint_path(run_dir: Path, checkpoint: str | None) -> Path | None:
    """The checkpoint to draw from; None when the run has none yet (only curves then)."""
    if checkpoint is None:
        return next((run_dir / n for n in ("best.pt", "last.pt") if (run_dir / n).is_file()), None)
    path = Path(checkpoint)
    if not path.is_file() and (run_dir / path).is_file():
        path = run_dir / path
    if not path.is_file():
        raise FiguresError(f"{path}: no such checkpoint file")
    return path


def make_figures(args: argparse.Namespace, say: Reporter) -> list[Path]:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FiguresError(f"{run_dir}: no such run folder")
    if not any((run_dir / n).exists() for n in ("config.json", "metrics.jsonl", "last.pt", "best.pt")):
        raise FiguresError(f"{run_dir}: not a run folder (no config.json, metrics.jsonl or checkpoint)")
    written = []
    if "curves" in args.only:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        if metrics:
            plot_curves(metrics, run_dir / "curves.png", title=curves_caption(run_dir, metrics))
            written.append(run_dir / "curves.png")
        else:
            say.line(f"figures: {run_dir / 'metrics.jsonl'}: no finished epoch yet; no curves.png")
    rest = [f for f in args.only if f != "curves"]
    if not rest:
        return written
    path = checkpoint_path(run_dir, args.checkpoint)
    if path is None:
        say.line(f"figures: {run_dir}: no checkpoint yet; no {' or '.join(f + '.png' for f in rest)}")
        return written
    device = args.device or weights.default_device()
    trained = weights.load(path, records=args.records, device=device)
    say.line(f"figures: weights of {path} (epoch {trained.epoch}, step {trained.step}) on {device}")
    if "conv1" in rest:
        summary = conv1_figure(trained.net, run_dir, checkpoint_caption(trained))
        shares = ", ".join(f"tower {i}: {s:.3f}" for i, s in enumerate(summary["colour_share"]))
        say.line(f"figures: conv1 colour share of kernel energy (0 = grey, random = 0.667): {shares}")
        written.append(run_dir / "conv1.png")
    if "neighbours" in rest:
        opts = NeighbourOptions(queries=args.queries, k=args.neighbours, batch_size=args.batch_size,
                                train_limit=args.train_limit)
        neighbours_figure(trained, run_dir, device, opts, say)
        written.append(run_dir / "neighbours.png")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    say = Reporter(enabled=True, progress=sys.stdout.isatty())

    def work() -> None:
        written = make_figures(args, say)
        say.line("figures: wrote " + (", ".join(str(p) for p in written) or "nothing"))
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
