"""Pieces shared by the fused kernels: where they can run, argument checks, tl.dot settings, @triton.jit helpers."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from stvfm_engine.errors import KernelArgError, STVFMError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built by Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def running_interpreted() -> bool:
    """Whether this process's stvfm kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return interpreted(gelu)


def why_not_runnable(device: str | torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the stvfm kernels can run on ``device`` (at compute ``dtype``) in this process, else why not.

    CUDA devices run them compiled; a CPU only in Triton's interpreter, which must have been switched
    on (``TRITON_INTERPRET=1``) before this package was imported.
    """
    device = torch.device(device)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        return f"the stvfm kernels compute in float32, bfloat16 or float16, not {dtype}"
    if device.type == "cpu":
        if running_interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after stvfm_engine.kernels was imported, so its kernels were "
                    "compiled for a GPU: set it before starting Python")
        return ("the stvfm kernels run on a CPU only in Triton's interpreter (slow, for tests): set "
                "TRITON_INTERPRET=1 before starting Python, or use a CUDA device")
    if device.type != "cuda":
        return f"the stvfm kernels run on cuda (or on a CPU under TRITON_INTERPRET=1), not {device.type}"
    if not torch.cuda.is_available():
        build = " (a CPU-only build)" if torch.version.cuda is None else ""
        return f"torch {torch.__version__} sees no CUDA device{build}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return f"{device} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)"
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(index)} has no bfloat16 support: use fp16 or fp32"
    return None


def check_device(kernel, *tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; refuse anything else."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreted(kernel):
            raise STVFMError(
                f"the stvfm Triton kernels need CUDA tensors, got a {t.device.type} tensor; on a CPU they run "
                "only in Triton's interpreter (set TRITON_INTERPRET=1 before importing stvfm_engine.kernels)")


def check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise KernelArgError(f"{what} must be float32, bfloat16 or float16, got {t.dtype}")


def check_args(op: str, like: torch.Tensor, shapes: dict[str, tuple[Optional[torch.Tensor], tuple]],
               any_strides: tuple[str, ...] = ()) -> None:
    """The contract of a public op's tensor arguments, each refused with a one-line error.

    ``shapes`` maps a name to ``(tensor, expected shape)`` (None in the shape: any size; a None tensor
    is skipped). Every tensor must be on ``like``'s device and have the expected shape; all but those
    named in ``any_strides`` must be contiguous (the kernels index them without strides).
    """
    for name, (t, shape) in shapes.items():
        if t is None:
            continue
        if t.device != like.device:
            raise KernelArgError(f"{op}: {name} is on {t.device}, expected {like.device} like the input")
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            want = ", ".join("*" if s is None else str(s) for s in shape)
            raise KernelArgError(f"{op}: {name} must be [{want}], got {list(t.shape)}")
        if name not in any_strides and not t.is_contiguous():
            raise KernelArgError(f"{op}: {name} must be contiguous, got strides {list(t.stride())} "
                                 f"for {list(t.shape)}")


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
