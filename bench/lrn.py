"""LRN forward+backward time and peak memory on conv1-sized activations: ours vs torch's module.

    python -m bench.lrn                                  # CPU, batch 32, (32, 96, 55, 55)
    python -m bench.lrn --dtype bf16 --channels-last
    python -m bench.lrn --against /tmp/lrn_old.py        # also an older model/lrn.py
    python -m bench.lrn --device cuda:0 --dtype bf16 --channels-last --batch-size 128

Contenders, interleaved on the same input: "ours" (model.lrn with its device default: the
compiled maths on CUDA, eager torch ops on the CPU), "torch" (torch.nn.LocalResponseNorm(5,
alpha=5e-4, beta=0.75, k=2): the paper's LRN across all 96 channels, so no tower boundary; it
costs the same) and, with ``--against FILE``, FILE's ``local_response_norm``. Peak memory is
what one forward+backward adds above the input and its gradient (the transient high point;
"kept for backward" is what stays alive between the two passes, and adds up across layers
when a whole net runs): on CUDA the allocator's
peak, on the CPU the process's peak resident set (Linux; tensors this large are mmap'd and
returned at free, so the peak RSS is the tensors' peak).
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
from dataclasses import dataclass, field

import torch

from common.config import check_at_least, parse_args, to_dict
from common.devices import parse_device, sync
from common.errors import UserError, error_line
from common.system import machine
from common.timing import interleaved
from model.lrn import local_response_norm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LrnBenchConfig:
    device: str = field(default="cpu", metadata={"help": "cpu or cuda:N"})
    batch_size: int = field(default=32, metadata={"help": "activations per step"})
    dtype: str = field(default="fp32", metadata={"help": "input dtype", "choices": list(DTYPES)})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format"})
    repeats: int = field(default=7, metadata={"help": "interleaved timed rounds (median taken)"})
    steps: int = field(default=3, metadata={"help": "forward+backward passes per timed turn"})
    against: str | None = field(default=None, metadata={"help": "also time this file's local_response_norm"})

    def __post_init__(self) -> None:
        check_at_least(self, ("batch_size", "repeats", "steps"))


def contenders(cfg: LrnBenchConfig) -> dict:
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    runs = {"ours": lambda a: local_response_norm(a, groups=2),
            "torch": lambda a: torch_lrn(a.float()).to(a.dtype)}
    if cfg.against:
        spec = importlib.util.spec_from_file_location("lrn_against", cfg.against)
        if spec is None or spec.loader is None:
            raise UserError(f"{cfg.against}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        runs["against"] = lambda a: module.local_response_norm(a, groups=2)
    return runs


def peak_bytes(step, device: torch.device) -> int:
    """Memory one call of ``step`` adds at its peak (see the module's docstring)."""
    sync([device])
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync([device])
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as fh:   # resets VmHWM to the current RSS
        fh.write("5")
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes autograd keeps from the forward for the backward (the input counted once: it
    stays alive for as long as the LRN's backward may run)."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.data_ptr()] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(kept.values())


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


def run(cfg: LrnBenchConfig) -> dict:
    device = parse_device(cfg.device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    # conv1's ReLU output: 96 channels of 55x55, alpha * sum a^2 ~ 0.005 (k = 2 dominates)
    x = (torch.randn(cfg.batch_size, 96, 55, 55, generator=g) * 4).relu().to(device, DTYPES[cfg.dtype])
    x = x.contiguous(memory_format=fmt).requires_grad_()
    grad = torch.ones_like(x)

    def step_of(fn):
        def step() -> None:
            fn(x).backward(grad)
            x.grad = None
        return step

    fns = contenders(cfg)
    steps = {name: step_of(fn) for name, fn in fns.items()}
    for step in steps.values():      # untimed: compile (CUDA), allocator, page faults
        step()
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    saved = {name: saved_bytes(fn, x) for name, fn in fns.items()}

    def turn(step):
        def go() -> int:
            for _ in range(cfg.steps):
                step()
            return cfg.steps
        return go
    samples = interleaved({n: turn(s) for n, s in steps.items()}, cfg.repeats, devices=[device], alternate=True)
    ms = {n: statistics.median(1e3 * s.wall / s.items for s in v) for n, v in samples.items()}
    return {"config": to_dict(cfg), "machine": machine([cfg.device]), "threads": torch.get_num_threads(),
            "activation_mib": x.numel() * x.element_size() / 2 ** 20,
            "ms_per_fwd_bwd": ms, "peak_mib": {n: b / 2 ** 20 for n, b in peaks.items()},
            "saved_mib": {n: b / 2 ** 20 for n, b in saved.items()}}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(LrnBenchConfig, argv, prog="python -m bench.lrn", description=__doc__.split("\n")[0])
    try:
        result = run(cfg)
    except (UserError, OSError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    ms, peak, saved = result["ms_per_fwd_bwd"], result["peak_mib"], result["saved_mib"]
    print(f"LRN fwd+bwd, ({cfg.batch_size}, 96, 55, 55) {cfg.dtype} "
          f"{'channels_last' if cfg.channels_last else 'NCHW'} on {cfg.device} "
          f"({result['activation_mib']:.1f} MiB), {result['threads']} threads")
    for name in ms:
        print(f"  {name:8s} {ms[name]:8.1f} ms  x{ms[name] / ms['ours']:.2f} of ours   "
              f"peak +{peak[name]:7.1f} MiB   kept for backward {saved[name]:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
