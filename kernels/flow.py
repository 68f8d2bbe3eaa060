"""Temporal-difference flow (stages 0-2): normalise, ST flow, pad and patchify, both branches in one pass.

``torch.ops.stvfm.flow_patchify(x, mean, std, patch, out_dtype)`` reads ``x [B, T, C, H, W]`` once and
writes ``u [2B, n, T, C*p*p]``: the raw branch ``patchify(x^)`` in rows ``0..B-1``, the flow branch
``patchify(temporal_difference(x^))`` in rows ``B..2B-1``, ready for the token adapter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from stvfm_engine.kernels.common import KernelArgError, check_args, check_device, check_dtype
from stvfm_engine.model.stvfm import normalize, patchify, temporal_difference


@triton.jit
def _flow_kernel(
    x_ptr,  # [B, T, C, H, W] raw input, any strides
    mean_ptr,  # [C] fp32
    std_ptr,  # [C] fp32
    u_ptr,  # [2B, n, T, K] out, K = C*P*P: raw branch in rows 0..B-1, flow branch in rows B..2B-1
    stride_xb, stride_xt, stride_xc, stride_xh, stride_xw,
    stride_ub, stride_un, stride_ut, stride_uk,
    B, T, H, W, n, w_tok, K,
    P: tl.constexpr,  # patch size
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_K: tl.constexpr,  # >= K
):
    # One program: BLOCK_N tokens of one sample, every step. x_t is read once; x^_{t-1} stays in registers.
    b = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    ch, pr, pc = k // (P * P), (k // P) % P, k % P  # token vector order (C, p_row, p_col)
    row = (tok // w_tok)[:, None] * P + pr[None, :]
    col = (tok % w_tok)[:, None] * P + pc[None, :]
    valid = (tok < n)[:, None] & (k < K)[None, :]
    inside = valid & (row < H) & (col < W)  # the rest is the zero padding of the grid

    mean = tl.load(mean_ptr + ch, mask=k < K, other=0.0)[None, :]
    std = tl.load(std_ptr + ch, mask=k < K, other=1.0)[None, :]
    x_ptrs = x_ptr + b * stride_xb + ch[None, :] * stride_xc + row * stride_xh + col * stride_xw
    u_off = tok[:, None] * stride_un + k[None, :] * stride_uk
    raw_ptrs = u_ptr + b * stride_ub + u_off
    flow_ptrs = u_ptr + (B + b) * stride_ub + u_off

    prev = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for t in range(T):
        xt = tl.load(x_ptrs + t * stride_xt, mask=inside, other=0.0).to(tl.float32)
        xn = tl.where(inside, (xt - mean) / std, 0.0)
        flow = tl.where(t > 0, xn - prev, 0.0)
        tl.store(raw_ptrs + t * stride_ut, xn.to(u_ptr.dtype.element_ty), mask=valid)
        tl.store(flow_ptrs + t * stride_ut, flow.to(u_ptr.dtype.element_ty), mask=valid)
        prev = xn


def flow_blocks(n: int, K: int) -> dict:
    """Launch constants: about 512 elements per program (~48 registers/thread on sm_90)."""
    BLOCK_K = triton.next_power_of_2(K)
    return {"BLOCK_N": max(1, min(triton.next_power_of_2(n), 512 // BLOCK_K)), "BLOCK_K": BLOCK_K}


@triton_op("stvfm::flow_patchify", mutates_args=())
def flow_patchify(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """``x [B, T, C, H, W]`` -> ``u [2B, n, T, C*p*p]`` in ``out_dtype`` (raw branch first, then flow)."""
    check_device(_flow_kernel, x)
    check_dtype(x, "x")
    if x.dim() != 5:
        raise KernelArgError(f"flow_patchify: x must be [B, T, C, H, W], got {list(x.shape)}")
    B, T, C, H, W = x.shape
    p = int(patch)
    if p < 1:
        raise KernelArgError(f"flow_patchify: patch must be >= 1, got {patch}")
    check_args("flow_patchify", x, {"mean": (mean, (C,)), "std": (std, (C,))})
    h, w = -(-H // p), -(-W // p)
    n, K = h * w, C * p * p
    u = torch.empty(2 * B, n, T, K, dtype=out_dtype, device=x.device)
    blocks = flow_blocks(n, K)
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), B)
    wrap_triton(_flow_kernel)[grid](
        x, mean, std, u,
        *x.stride(), *u.stride(),
        B, T, H, W, n, w, K,
        P=p, **blocks,
    )
    return u


def flow_patchify_ref(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: int,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain PyTorch reference of :func:`flow_patchify` (the reference model's stages 0-2)."""
    xn = normalize(x.float(), mean, std)
    return torch.cat([patchify(xn, patch), patchify(temporal_difference(xn), patch)], dim=0).to(out_dtype)
