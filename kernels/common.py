"""Pieces shared by the fused kernels: device checks, tl.dot settings, and small @triton.jit helpers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from stvfm_engine.errors import STVFMError

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built by Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; refuse anything else."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreted(kernel):
            raise STVFMError(
                f"the stvfm Triton kernels need CUDA tensors, got a {t.device.type} tensor; on a CPU they run "
                "only in Triton's interpreter (set TRITON_INTERPRET=1 before importing stvfm_engine.kernels)")


def check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise STVFMError(f"{what} must be float32, bfloat16 or float16, got {t.dtype}")


def dot_flags(kernel, dtype: torch.dtype) -> dict:
    """The ``DOT_PREC`` / ``UPCAST_DOT`` constexprs of :func:`mma` for operands of ``dtype``.

    fp32 operands use exact ("ieee") products, never TF32: the fp32 path must match the reference.
    Triton's interpreter (3.8) gets ``tl.dot`` of bfloat16 operands wrong, so there the operands are
    widened to fp32 first; bf16 x bf16 products are exact in fp32, so the result is the same.
    """
    return {"DOT_PREC": "ieee", "UPCAST_DOT": interpreted(kernel) and dtype == torch.bfloat16}


def block(n: int, lo: int = 16) -> int:
    """A power-of-two block covering ``n`` (at least ``lo``: tl.dot needs 16 on each side)."""
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (see :func:`dot_flags`)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def gelu(x):
    """Exact (erf) GELU, as ``torch.nn.functional.gelu`` by default."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
