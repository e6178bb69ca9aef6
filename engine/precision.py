"""Mixed precision in one place: the autocast context and, for fp16, the gradient scaler.

    precision = Precision("fp16", "cuda")
    with precision.autocast():
        loss = criterion(model(images).float(), labels)
    precision.backward(loss)
    skipped = precision.step(optimizer)      # 0-dim bool tensor on the device, no host sync
    checkpoint["precision"] = precision.state_dict()

"bf16": autocast only (bf16 has float32's exponent range, nothing to scale). "fp16": autocast
plus ``torch.amp.GradScaler``: the loss is multiplied by the scale before backward, the
gradients are unscaled before the update, and a step whose gradients hold inf/nan is skipped
(the parameters are untouched, the scale halves). A skipped step is the scaler doing its job,
not divergence: the loop must NOT stop on it; it still stops on a non-finite loss.
The scaler's state (scale, growth tracker) belongs in the checkpoint: without it a resumed
run restarts at scale 2^16 and skips steps an uninterrupted run does not.
"""
from __future__ import annotations

import torch

AMPS = ("none", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``amp``: "none" | "bf16" | "fp16"; ``device_type``: "cpu" or "cuda" (where the model runs)."""

    def __init__(self, amp: str = "none", device_type: str | torch.device = "cpu"):
        if isinstance(device_type, torch.device):
            device_type = device_type.type
        if amp not in AMPS:
            raise ValueError(f"amp must be one of {', '.join(AMPS)}; got {amp!r}")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda'; got {device_type!r}")
        self.amp, self.device_type = amp, device_type
        self.dtype = DTYPES.get(amp)          # None: float32, no autocast
        self.scaler = torch.amp.GradScaler(device_type) if amp == "fp16" else None

    def autocast(self):
        """The forward's context: autocast to bf16/fp16, or a disabled one for "none"."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16,
                              enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), on the scaled loss for fp16 (the gradients come out scaled)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """optimizer.step() (fp16: unscale, skip on inf/nan, update the scale). Returns a 0-dim
        bool tensor, True when the step was skipped; it stays on the device (reading it is a
        host sync: accumulate it and read it when the loop reads its losses)."""
        if self.scaler is None:
            optimizer.step()
            return torch.zeros((), dtype=torch.bool)
        self.scaler.step(optimizer)
        skipped = _found_inf(self.scaler, optimizer)
        if skipped is None:     # no access to the flags: update() lowers the scale iff skipped
            before = self.scaler.get_scale()     # host sync
            self.scaler.update()
            return torch.tensor(self.scaler.get_scale() < before)
        self.scaler.update()
        return skipped

    @property
    def scale(self) -> float:
        """The current loss scale (1.0 without a scaler); reading it is a host sync."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def state_dict(self) -> dict:
        return {"amp": self.amp,   # the skipped-step count lives in the epoch sums (amp_skipped)
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state. The scaler's part is used only when both runs are fp16
        (a bf16 checkpoint resumed in fp16 starts a fresh scaler, and vice versa)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def __repr__(self) -> str:
        return f"Precision(amp={self.amp!r}, device_type={self.device_type!r})"


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Whether ``scaler.step`` just skipped ``optimizer``'s step, as a tensor on the first
    parameter device (a model split over two GPUs has one flag per device), or None.

    GradScaler keeps its per-device inf/nan flags until ``update()`` but has no public
    accessor for them; None where that internal layout is missing."""
    states = getattr(scaler, "_per_optimizer_states", None)
    found = states.get(id(optimizer), {}).get("found_inf_per_device") if isinstance(states, dict) else None
    if not found:
        return None
    flags = list(found.values())
    return torch.stack([f.reshape(()).to(flags[0].device) for f in flags]).sum() > 0
