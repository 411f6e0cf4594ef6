"""The precision policy: which dtype the forward passes compute in, on this device.

Weights and optimizer state are always fp32; ``train.precision`` chooses bf16 autocast or fp32 for
the forward passes of the experts, D and the classifier alike.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def cpu_flags() -> tuple[str, ...]:
    """The CPU features that CPU speed figures are named by, as /proc/cpuinfo names them (empty where
    unreadable); the bf16 ones decide ``precision=auto``."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return ()
    return tuple(f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in text.split())


# oneDNN's ISA levels without bf16 instructions: ONEDNN_MAX_CPU_ISA at one of these keeps the convolutions
# off the bf16 kernels whatever the CPU has.
ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def _onednn_max_isa() -> str:
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()


def describe_cpu() -> str:
    """What every CPU speed figure names: the flags and the kernels ATen (and a capped oneDNN) dispatch to."""
    isa = _onednn_max_isa()
    return (f"CPU flags {' '.join(cpu_flags()) or '-'}, ATen {torch.backends.cpu.get_cpu_capability()}"
            + (f", oneDNN max ISA {isa}" if isa else ""))


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    # The instructions alone are not enough: the kernels must be allowed to use them. ATEN_CPU_CAPABILITY
    # caps ATen's (and inductor's), ONEDNN_MAX_CPU_ISA oneDNN's convolutions; under either cap bf16 has no
    # native kernels for much of the step. Both libraries read their cap once per process, so the answer is
    # decided once too (every step's autocast asks).
    return (bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and _onednn_max_isa() not in ONEDNN_BELOW_BF16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX whose AVX-512 kernels ATen and oneDNN may use), else fp32. Elsewhere bf16 autocast is emulated and
    slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def world_size_promise(precision: str, device: torch.device) -> str:
    """What a run in ``precision`` (resolved) promises across world sizes, as the trainer's start-up line says it
    (the README says the same, docs/testing.md what pins it).

    bf16: every rank rounds its own partial sums (D's weight gradients are bf16 before DDP adds the ranks'
    shares), so another world size rounds differently and near-equal scores can swap winners. CUDA: fp32
    convolutions run in TF32 (torch's cuDNN default) and cuDNN picks its algorithms; nothing is measured there."""
    if device.type == "cuda":
        return f"precision {precision} (world-size invariance is tested on CPUs only; on CUDA winners may differ)"
    if precision == "fp32":
        return "precision fp32 (the same winners at every world size)"
    return ("precision bf16 (winners may differ across world sizes where scores are within bf16 rounding; "
            "train.precision=fp32 for world-size invariance)")


def autocast(device: torch.device, precision: str):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
