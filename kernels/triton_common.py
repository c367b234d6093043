"""Shared helpers for the Triton hybrid-attention kernels (forward/backward and decode).

Runs on Triton 3.6 (GPU machine) and current Triton: plain pointer arithmetic with masks, no
`tl.make_block_ptr` (removed in 3.9). Under `TRITON_INTERPRET=1` (CI, CPU tensors, fp32 only) the
kernels use one autotune config, because multi-config autotuning needs a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E): the scale is folded into the scores
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def block_size(n: int, minimum: int = 16) -> int:
    """Power-of-two block covering n; tl.dot needs every dimension >= 16."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def check_runnable(**tensors: torch.Tensor) -> None:
    """Triton needs every tensor on one device: CUDA, or CPU under the interpreter. Keyword names
    are the arguments' names (the first one sets the device), so the error names the culprit."""
    (first, dev), *rest = ((name, t.device) for name, t in tensors.items())
    for name, d in rest:
        if d != dev:
            raise ValueError(f"{name}: expected device {dev} (the device of {first}), got {d}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"{first}: the triton backend needs CUDA tensors (got device {dev}); use backend='torch' on CPU "
            "or set TRITON_INTERPRET=1 before importing triton"
        )


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` current for a kernel launch: Triton launches on the *current* CUDA device, so a
    layer placed on cuda:1 (`device_map="auto"`) would otherwise run on cuda:0's stream with cuda:1
    pointers. Every launch site wraps its launch in `with device_guard(<its tensors' device>):`.
    A no-op for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def compute_dtype(x: torch.Tensor, name: str = "q") -> torch.dtype:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32 for the triton backend, got {x.dtype}")
    return x.dtype


def autotune_configs(options: list[dict], warps=(4, 8), stages=(1, 2)) -> list[triton.Config]:
    """All combinations on a GPU; a single (the first) config under the interpreter.

    The hybrid kernels pass warps=(8,): at D = F = 128 on sm_90, 4 warps spill 3-5x more registers
    (`benchmarks/bench_kernels.py --compile-check`)."""
    if interpreting():
        return [triton.Config(dict(options[0]), num_warps=warps[0], num_stages=stages[0])]
    return [triton.Config(dict(o), num_warps=w, num_stages=s) for o in options for w in warps for s in stages]


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
    """tl.dot with fp32 accumulation; IEEE (exact fp32) for fp32 operands, else tensor cores."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def mm_state(a, b, IEEE: tl.constexpr):
    """A read-out of the fp32 state (phi_q.S, g.S^T): both operands stay fp32, never narrowed to the
    input dtype (the state grows with T and overflows fp16's 65504 at long T). Exact under IEEE,
    else TF32 tensor cores: fp32's range with fp16's 10-bit mantissa, and more precise than the bf16
    operands of the other dots."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    return out


@triton.jit
def load_rows(ptr, base, rows, row_ok, offs, width, ROW_STRIDE: tl.constexpr):
    """Load a [len(rows), len(offs)] tile of a row-major [T, ROW_STRIDE] matrix; zeros off-range."""
    mask = row_ok[:, None] & (offs[None, :] < width)
    return tl.load(ptr + base + rows[:, None].to(tl.int64) * ROW_STRIDE + offs[None, :], mask=mask, other=0.0)


@triton.jit
def load_rows_t(ptr, base, rows, row_ok, offs, width, ROW_STRIDE: tl.constexpr):
    """Transposed tile: [len(offs), len(rows)]."""
    mask = row_ok[None, :] & (offs[:, None] < width)
    return tl.load(ptr + base + rows[None, :].to(tl.int64) * ROW_STRIDE + offs[:, None], mask=mask, other=0.0)
