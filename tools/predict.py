"""Classify image files with a trained AlexNet: top-5 classes with probabilities.

    python predict.py IMAGES_OR_FOLDERS... [--checkpoint FILE|RUN_DIR] [--tencrop] [--device cuda:0]

The preprocessing is training's: the records' 256x256 image (shorter side to 256, central
square, prep.transform), then the central 224 crop or the paper's 10 crops (corners, centre,
and their mirrors) with the softmax averaged over them, minus the run's mean (RGB or per pixel),
0-255 scale, not divided by std. ``--checkpoint`` takes a training checkpoint (its records
folder gives the class names and mean) or a file written by ``python -m tools.export`` in its
default state_dict format (the traced formats are for other programs). Without it: the run
under runs/ whose checkpoint was written last (its best.pt, else last.pt), named on stderr.
Output: per image its path, then one line per class: rank, probability, wnid and the class name
where the records have one (``  1.  42.00%  n03445777 golf ball``; split at most 3 times to parse);
control characters in paths and names are written escaped (``\\n``), so no line ever breaks.
Exit status: 0 done, 2 bad input: a missing checkpoint or image is one ``error:`` line before
anything runs; an image that cannot be read or decoded is one ``error:`` line, the other images
are still classified, and the exit status is 2 at the end.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from common.cli import USER_ERROR, run_command
from common.config import Parser
from common.console import one_line
from common.errors import UserError
from pipeline import reference
from prep.transform import ImageError, decode_record

from tools import weights
from engine.voting import vote

TOP = 5
BATCH = 32           # images per forward (x10 views with --tencrop)


class PredictError(UserError):
    """A missing or unreadable image, or no checkpoint to use; one line."""


def image_files(paths: list[str]) -> list[Path]:
    """The files named, and the files inside named folders (sorted, not recursive)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"{path}: no such image file or folder")
    if not files:
        raise PredictError(f"{', '.join(paths)}: no image files")
    return files


def load_image(path: Path) -> np.ndarray:
    """The record image of a file: uint8 (256, 256, 3), exactly what prep writes to the records."""
    try:
        return decode_record(path.read_bytes())
    except ImageError as exc:
        raise PredictError(f"{path}: {exc}") from None
    except OSError as exc:
        raise PredictError(f"{path}: unreadable ({exc.strerror or exc})") from None


def views(images: list[np.ndarray], mean: np.ndarray, tencrop: bool) -> torch.Tensor:
    """(N, 3, 224, 224) centre crops or (N, 10, 3, 224, 224) ten crops, float32, minus mean."""
    make = reference.ten_crop if tencrop else reference.center_view
    return torch.from_numpy(np.stack([make(img, mean) for img in images]))


@torch.no_grad()
def probabilities(trained: weights.Trained, images: list[np.ndarray], tencrop: bool = False) -> torch.Tensor:
    """(N, classes) softmax probabilities (the mean over the 10 crops with ``tencrop``), float32 CPU."""
    out = []
    for start in range(0, len(images), BATCH):
        x = views(images[start:start + BATCH], trained.mean, tencrop).to(trained.net.input_device)
        if tencrop:
            n = x.shape[0]
            out.append(vote(trained.net(x.flatten(0, 1)).view(n, 10, -1)).cpu())
        else:
            out.append(torch.softmax(trained.net(x).float(), dim=1).cpu())
    return torch.cat(out)


def describe(trained: weights.Trained, index: int) -> str:
    """``n03445777 golf ball``: the wnid, then its name where the records have one; control
    characters escaped, so each class is one line whatever the names file held."""
    wnid = one_line(trained.classes[index])
    name = one_line(trained.names[index]) if trained.names else None
    return f"{wnid} {name}" if name and name != wnid else wnid


def default_checkpoint(runs: Path = Path("runs")) -> Path:
    """The checkpoint of the run folder under ``runs`` whose best.pt or last.pt was written last,
    its best.pt if it has one (last.pt before the first validation). By time, not by name: --out
    names run folders freely (runs/alexnet sorts after every timestamp)."""
    found = []
    for run in runs.glob("*"):
        files = [run / name for name in ("best.pt", "last.pt") if (run / name).is_file()]
        if files:
            found.append((max(f.stat().st_mtime_ns for f in files), run.name, files[0]))
    if not found:
        raise PredictError("no checkpoint: pass --checkpoint FILE (a run's best.pt or an exported alexnet.pt)")
    return max(found)[2]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--checkpoint", default=None, help="checkpoint, run folder or exported weights "
                                                       "(default: the newest checkpoint under runs/, "
                                                       "a run's best.pt before its last.pt)")
    p.add_argument("--records", default=None, help="records folder for class names and mean "
                                                   "(default: the one the run trained on)")
    p.add_argument("--tencrop", action="store_true", help="average the softmax over the paper's 10 crops")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when a GPU is visible)")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))

    def work() -> int:
        files = image_files(args.images)
        checkpoint = args.checkpoint
        if not checkpoint:
            checkpoint = default_checkpoint()
            # stderr: stdout stays the images' classes only
            print(f"checkpoint: {checkpoint} (the newest under runs/; --checkpoint to choose)", file=sys.stderr,
                  flush=True)
        trained = weights.load(checkpoint, records=args.records, device=args.device or weights.default_device())
        # an OSError from here on: stdout gone (predict.py DIR | head), a device error
        return USER_ERROR if classify(trained, files, args.tencrop) else 0
    return run_command(work)


def classify(trained: weights.Trained, files: list[Path], tencrop: bool) -> int:
    """Print each file's top classes; an unreadable one is an error line. Returns how many failed."""
    failed = 0
    for start in range(0, len(files), BATCH):
        chunk, images = [], []
        for path in files[start:start + BATCH]:
            try:       # one bad file in a folder of photos: named, and the others still classified
                images.append(load_image(path))
                chunk.append(path)
            except PredictError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                failed += 1
        if not chunk:
            continue
        for path, row in zip(chunk, probabilities(trained, images, tencrop)):
            top = row.topk(min(TOP, row.numel()))
            print(one_line(str(path)))
            for rank, (prob, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
                print(f"  {rank}. {prob:7.2%}  {describe(trained, index)}")
    return failed
