"""Export a trained AlexNet: weights only (no momentum), with its class list and mean inside.

    python -m tools.export RUN_DIR|CHECKPOINT --out alexnet.pt [--format state_dict] [--records DIR]

Formats (``--format``):
- ``state_dict`` (default): a ``torch.save`` dict readable with ``torch.load(f, weights_only=True)``
  and nothing else of this repo: ``model`` (the state dict, float32, keys ``towers.<t>.conv1.weight``
  ... ``towers.<t>.fc7.bias``, ``fc8.weight``, ``fc8.bias``; docs/model.md has the
  layer table), ``config`` (the model's switches: towers, lrn, overlap_pool, dropout, init,
  num_classes), ``classes`` (wnids in index order), ``names`` (class names in index order, the wnid
  where the records give none), ``mean`` (float32, 0-255
  scale: (3,) RGB or (256, 256, 3) with ``mean_kind`` "pixel"), ``format``, ``epoch``, ``step``.
  ``tools.weights.load`` / predict.py read it back into this repo's AlexNet.
- ``torchscript``: ``torch.jit.trace`` of the net in eval mode (any batch size), loadable with
  ``torch.jit.load``; the same metadata as JSON in its extra file ``meta.json``.
- ``export``: ``torch.export`` ExportedProgram with a dynamic batch dimension (``torch.export.load``),
  extra file ``meta.json`` as above.
- ``onnx``: opset 17 with a dynamic batch dimension, metadata in the model's ``metadata_props``;
  needs the ``onnx`` package.

Every format takes float (B, 3, 224, 224) on the 0-255 scale minus ``mean`` (not divided by std) and
returns (B, classes) logits; the softmax (and the 10-crop vote) are left to the caller.
Exit status: 0 done, 2 bad input (one ``error:`` line); the output file is written atomically.
"""
from __future__ import annotations

import io
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.atomic import write_bytes
from common.cli import run_command
from common.config import Parser
from common.errors import UserError

from tools import weights

FORMATS = ("state_dict", "torchscript", "export", "onnx")
ONNX_OPSET = 17


class ExportError(UserError):
    """An export that cannot be made here (a missing optional package); one line."""


def metadata(trained: weights.Trained) -> dict:
    """Everything but the weights, as plain values (the JSON of the non-state-dict formats)."""
    return {"format": weights.WEIGHTS_FORMAT, "config": asdict(trained.net.cfg), "classes": trained.classes,
            "names": trained.names, "mean_kind": "pixel" if trained.mean.ndim == 3 else "channel",
            "epoch": trained.epoch, "step": trained.step,
            "input": "float (B, 3, 224, 224), 0-255 scale minus mean (not divided by std); output: logits"}


def state_dict_bytes(trained: weights.Trained) -> bytes:
    model = {k: v.detach().float().cpu().clone() for k, v in trained.net.state_dict().items()}
    buf = io.BytesIO()
    torch.save({**metadata(trained), "model": model, "mean": torch.from_numpy(trained.mean.copy())}, buf)
    return buf.getvalue()


def meta_json(trained: weights.Trained) -> str:
    return json.dumps({**metadata(trained), "mean": np.asarray(trained.mean, np.float64).round(4).tolist()})


def example_input(trained: weights.Trained) -> torch.Tensor:
    return torch.zeros(2, 3, 224, 224, device=trained.net.input_device)


@torch.no_grad()
def torchscript_bytes(trained: weights.Trained) -> bytes:
    # under no_grad the LRN runs as plain ops (its autograd.Function cannot be saved by TorchScript)
    with warnings.catch_warnings():
        # the input-shape checks become constants of the trace: true for every batch of
        # (B, 3, 224, 224), which is all the traced net takes (the tests check other batch sizes)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        module = torch.jit.trace(trained.net, example_input(trained), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(module, buf, _extra_files={"meta.json": meta_json(trained)})
    return buf.getvalue()


def exported(trained: weights.Trained) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=65536)
    return torch.export.export(trained.net, (example_input(trained),), dynamic_shapes=({0: batch},))


@torch.no_grad()
def export_bytes(trained: weights.Trained) -> bytes:
    program = exported(trained)
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"meta.json": meta_json(trained)})
    return buf.getvalue()


@torch.no_grad()
def onnx_bytes(trained: weights.Trained) -> bytes:
    try:
        import onnx
    except ImportError:
        raise ExportError("--format onnx needs the onnx package (pip install onnx onnxscript)") from None
    buf = io.BytesIO()
    try:
        torch.onnx.export(trained.net, (example_input(trained),), buf, input_names=["images"],
                          output_names=["logits"], opset_version=ONNX_OPSET,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    except ImportError as exc:        # torch's ONNX exporter has optional dependencies of its own
        raise ExportError(f"--format onnx: {exc}") from None
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "meta.json", meta_json(trained)
    return proto.SerializeToString()


WRITERS = {"state_dict": state_dict_bytes, "torchscript": torchscript_bytes, "export": export_bytes,
           "onnx": onnx_bytes}


def export(source: str | Path, out: str | Path, fmt: str = "state_dict", records: str | Path | None = None) -> Path:
    """Write ``source``'s weights (a run folder, checkpoint or weights file) to ``out`` as ``fmt``."""
    out = Path(out)
    if out.is_dir():                  # checked first: the atomic write would name its temp file
        raise ExportError(f"--out {out}: is a folder; give the file to write")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: its folder {out.parent} does not exist or is not a folder")
    trained = weights.load(source, records=records, device="cpu")
    data = WRITERS[fmt](trained)
    write_bytes(out, data)
    return trained.source


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m tools.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a run folder (its best.pt), a checkpoint or an exported weights file")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--format", default="state_dict", choices=FORMATS, help="what to write (default: state_dict)")
    p.add_argument("--records", default=None, help="records folder for the class list and mean "
                                                   "(default: the one the run trained on)")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))

    def work() -> None:
        source = export(args.source, args.out, args.format, args.records)
        size = Path(args.out).stat().st_size / 2 ** 20
        print(f"export: {source} -> {args.out} ({args.format}, {size:.1f} MiB)")
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
