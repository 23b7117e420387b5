"""Which floating-point precision a run computes in: fp32, bf16 autocast, or `auto`.

bf16 autocast pays off only where the hardware multiplies bf16 natively: CUDA GPUs that
support it (Ampere and later), and CPUs with AVX-512 BF16 or AMX. Elsewhere PyTorch emulates
it, and a run is an order of magnitude slower than fp32 (PLE through benchmarks/peers.py on an
AVX2-only AMD EPYC, 2 threads: 609 rows/s in bf16 against about 11,000 in fp32). `auto` picks
bf16 only where it is native; an explicit `bf16` where it is not is honoured, with one warning.

Example:
    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
    >>> resolve_precision("auto", torch.device("cpu")) == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    True
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


_warned: set[str] = set()


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`requested` ('fp32', 'bf16' or 'auto') made concrete for `device`; warns once per
    device type when bf16 is asked for where it is emulated."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and not native_bf16(device) and device.type not in _warned:
        _warned.add(device.type)
        what = "this CPU has neither AVX-512 BF16 nor AMX" if device.type == "cpu" else f"{device} has no native bf16"
        warnings.warn(f"train.precision bf16: {what}, so bf16 is emulated and much slower than fp32 (PLE on an "
                      "AVX2-only CPU: 609 rows/s in bf16 against about 11,000 in fp32); precision: auto picks bf16 "
                      "only where it is native", RuntimeWarning, stacklevel=2)
    return "bf16" if requested == "bf16" else "fp32"


__all__ = ["Precision", "native_bf16", "resolve_precision"]
