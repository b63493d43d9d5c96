"""Where PyTorch work runs, and at what precision.

``device``: ``auto`` (CUDA when present, else Apple ``mps``, else the CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``. A device that is asked for by name and is not there is an error, never a
silent fall-back to the CPU. ``precision``: ``fp32`` (default), ``bf16`` or ``fp16`` mixed precision
through :func:`torch.autocast` (fp16 adds a gradient scaler; on the CPU only bf16 is offered).
"""

from __future__ import annotations

import contextlib

import torch

from recforge.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` a ``device`` option names; a clear error when it is absent."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ConfigError("device=mps: this PyTorch sees no Apple GPU; use device=cpu or device=auto")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={spec}: this PyTorch sees no CUDA GPU (CPU build or no driver); "
                              "use device=cpu or device=auto, or install a CUDA build of PyTorch")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={spec}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return dev
    raise ConfigError(f"device={spec!r}: choose auto, cpu, cuda, cuda:N or mps")


def check_precision(precision: str, device: torch.device) -> str:
    p = str(precision or "fp32").lower()
    if p not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if p == "fp16" and device.type == "cpu":
        raise ConfigError("precision=fp16 is not supported on the CPU; use precision=bf16 or fp32")
    return p


def autocast(device: torch.device, precision: str):
    """A context that runs the forward pass at ``precision`` (a no-op at fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """A gradient scaler for fp16 (None otherwise: bf16 and fp32 need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def to_device(obj, device: torch.device, non_blocking: bool = True):
    """Tensors in ``obj`` (a tensor, or dicts / lists / tuples of them) moved to ``device``; other
    values unchanged. A no-op for tensors already there."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_device(v, device, non_blocking) for v in obj)
    if isinstance(obj, list):
        return [to_device(v, device, non_blocking) for v in obj]
    return obj


def describe(device: torch.device) -> str:
    """A short human name of the device (its GPU model where there is one)."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
