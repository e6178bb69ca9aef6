"""A small ImageNet-layout tree of real photographs, from the photos scikit-image ships offline.

    python -m bench.photos DIR [--n 60]         # also: python -m bench.prep --photos 60

The generated sample set is synthetic; the records' resize has to hold up on real photos (fine
texture, edges, noise), so tests and the prep benchmark also run on crops of ``skimage.data``'s
photographs (astronaut, cat, coffee, rocket, Hubble deep field, retina, coins, grass, gravel,
brick, ...). Each source photo is a class; each image is a random crop of it (random position,
55-100% of the shorter side, 4:3 or 3:4), saved at an ImageNet-like size: most with a shorter side
of 256-500 px (shrunk by the records), about one in six under 256 px (enlarged), one in eight
grayscale, and one CMYK JPEG. Crops are only ever shrunk here (OpenCV INTER_AREA), never enlarged,
so every file keeps a real photo's detail. Deterministic for a given ``seed``.

``sizes="imagenet"`` (``--sizes imagenet``) draws the sizes of ImageNet's training photos
instead, most of which are Flickr's 500-px size: 9 in 10 have a longer side of 500 px and are
4:3 or 3:2 (500×375, 500×333, portrait or landscape), 1 in 20 are small (shorter side 150–250,
enlarged by the records) and 1 in 20 large (longer side 800–1,200, from the two photos that
big). These decode like ImageNet's photos (~2–3× the pixels of the default mix), which is what
the writer's speed relative to the bare decode+resize+encode loop depends on.

scikit-image is a test extra (``pip install .[test]``), imported only here.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import run_command
from common.config import Parser
from common.errors import UserError

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "camera", "coins", "moon", "grass", "gravel", "brick", "clock")
SHORT_SIDES = (180, 224, 300, 333, 375, 375, 400, 500)   # shorter side of a saved crop (pixels)
QUALITY = 92                                               # JPEG quality of the "camera" files


def load_photos(names=PHOTOS) -> dict[str, np.ndarray]:
    """{name: uint8 (h, w, 3) RGB}; grayscale photos are repeated over 3 channels."""
    from skimage import data
    out = {}
    for name in names:
        arr = np.asarray(getattr(data, name)())
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        out[name] = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    return out


def _crop(photo: np.ndarray, rng) -> np.ndarray:
    import cv2
    h, w = photo.shape[:2]
    cs = int(min(h, w) * rng.uniform(0.55, 1.0))         # crop's shorter side, source pixels
    portrait = rng.random() < 0.3
    ch, cw = (min(h, cs * 4 // 3), cs) if portrait else (cs, min(w, cs * 4 // 3))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y:y + ch, x:x + cw]
    target = int(rng.choice(SHORT_SIDES))
    if target < min(ch, cw):
        scale = target / min(ch, cw)
        crop = cv2.resize(crop, (max(1, round(cw * scale)), max(1, round(ch * scale))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(crop)


def _imagenet_crop(photos: dict[str, np.ndarray], names: list[str], i: int, rng) -> tuple[int, np.ndarray]:
    """(class, crop) with ImageNet's size mix (module docstring); the class is the photo."""
    import cv2
    kind = rng.random()
    if kind < 0.05:      # small: shorter side 150-250, 4:3
        short = int(rng.integers(150, 251))
        size = (short, short * 4 // 3)
    elif kind < 0.10:    # large: longer side 800-1200, 4:3
        long = int(rng.integers(800, 1201))
        size = (long * 3 // 4, long)
    else:                # Flickr's 500 px: 500x375 or 500x333
        size = (375, 500) if rng.random() < 0.6 else (333, 500)
    if rng.random() < 0.25:
        size = size[::-1]                                   # portrait
    def fits(size):      # the classes whose photo holds a crop of this size
        return [c for c, n in enumerate(names) if photos[n].shape[0] >= size[0] and photos[n].shape[1] >= size[1]]
    if not fits(size):   # no photo that big in that orientation: take the landscape one
        size = tuple(sorted(size))
    classes = fits(size)
    c = classes[i % len(classes)]
    photo = photos[names[c]]
    h, w = photo.shape[:2]
    scale = rng.uniform(1.0, min(h / size[0], w / size[1]))   # source area per output pixel, >= 1
    ch, cw = min(h, round(size[0] * scale)), min(w, round(size[1] * scale))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y:y + ch, x:x + cw]
    if (ch, cw) != size:
        crop = cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return c, np.ascontiguousarray(crop)


def _encode(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


SIZES = ("mixed", "imagenet")


def make_photo_set(root: str | Path, n: int = 60, seed: int = 0, val_every: int = 5,
                   sizes: str = "mixed") -> Path:
    """Write ``n`` crops under ``root``/train/<wnid>/ and (every ``val_every``-th) ``root``/val/<wnid>/.
    ``sizes``: "mixed" (many small photos, for tests) or "imagenet" (module docstring)."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {SIZES}, got {sizes!r}")
    root = Path(root)
    photos = load_photos()
    names = sorted(photos)
    trained: set[int] = set()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        if sizes == "imagenet":
            c, arr = _imagenet_crop(photos, names, i, rng)
        else:
            c = i % len(names)
            arr = _crop(photos[names[c]], rng)
        grey_every = 8 if sizes == "mixed" else 50     # ImageNet: ~2% grayscale
        mode = "CMYK" if i == 3 else "L" if i % grey_every == 5 else "RGB"
        # every class gets a train image before any of its images goes to val
        split = "val" if val_every and c in trained and i % val_every == val_every - 1 else "train"
        trained.add(c)
        folder = root / split / f"n8{c:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{names[c]}_{i:05d}.JPEG").write_bytes(_encode(arr, mode))
    return root


def main(argv=None) -> int:
    ap = Parser(prog="python -m bench.photos", description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", choices=SIZES, default="mixed",
                    help="mixed: many small photos (tests); imagenet: ImageNet's size mix")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"--n {a.n}: at least one photo")

    def work() -> None:
        try:
            make_photo_set(a.root, a.n, a.seed, sizes=a.sizes)
        except ImportError:
            raise UserError("scikit-image is not installed (it ships the photos): pip install '.[test]'") from None
        print(f"wrote {a.n} photo crops to {a.root}")
    return run_command(work)


if __name__ == "__main__":
    raise SystemExit(main())
