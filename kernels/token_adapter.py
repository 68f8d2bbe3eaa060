"""Temporal-Aware Token Adapter (stage 3) for both branches: GELU once per token and step, one GEMM, fused LayerNorm.

``torch.ops.stvfm.token_adapter`` computes, for every token of ``u [2B, n, T, K]`` (raw branch rows
``0..B-1`` through adapter r, flow branch rows ``B..2B-1`` through adapter f)::

    a = u @ W_in + b_in + E_step[t] (+ E_tod[tod_t] + E_dow[dow_t])      # [.., T, A]
    z = LayerNorm(GELU(a).flatten(T, A) @ W_out + b_out) + pos            # [.., D]

and writes the backbone's input ``[2B, P+n, D]``: the ``P`` prefix tokens (with their position
embedding) followed by the ``n`` adapted tokens, so the backbone needs no concatenation. Three steps:
``_adapter_gelu_kernel`` materialises ``G = GELU(a)`` once per (token, step) in the compute dtype,
one batched library GEMM (cuBLAS on a GPU) computes ``G @ W_out`` for both branches, and
``_adapter_norm_kernel`` adds ``b_out``, normalises (fp32 statistics) and adds ``pos`` straight
into the output rows. This replaced a single kernel that recomputed ``u @ W_in`` and the GELU for
every chunk of ``D`` columns; its speed against that kernel is unmeasured until a GPU runs
``bench/gpu_check``. Stacked weights are prepared once by :func:`adapter_weights`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from stvfm_engine.kernels.common import (KernelArgError, block, check_args, check_device, check_dtype, dot_flags,
                                         gelu, mma)
from stvfm_engine.model.stvfm import LN_EPS, TokenAdapter


@triton.jit
def _adapter_gelu_kernel(
    u_ptr,  # [2B, n, T, K] tokens of both branches, any strides
    tod_ptr,  # [B, T] int64 time-of-day slots (read only if HAS_TIME)
    dow_ptr,  # [B, T] int64 days of week, tod's strides (read only if HAS_TIME)
    w_in_ptr,  # [2, K, A] W_in^T of each branch, contiguous
    b_in_ptr,  # [2, A] fp32
    e_step_ptr,  # [2, T, A] step embeddings
    e_tod_ptr,  # [2, S, A] time-of-day embeddings (read only if HAS_TIME)
    e_dow_ptr,  # [2, 7, A] day-of-week embeddings (read only if HAS_TIME)
    g_ptr,  # [2, B*n, T*A] out, contiguous: GELU(a) in u's dtype
    stride_ub, stride_un, stride_ut, stride_uk,
    stride_tb, stride_tt,
    B, n, T, K, A, S,
    HAS_TIME: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_K: tl.constexpr,  # >= K (>= 16 for tl.dot)
    BLOCK_A: tl.constexpr,  # >= A
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One program: BLOCK_M tokens of one branch at one step t. Each (token, t) is computed once.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # over the branch's B*n tokens
    t = tl.program_id(1)
    br = tl.program_id(2)  # 0: raw branch / adapter r, 1: flow branch / adapter f
    rmask = rows < B * n
    b = rows // n
    j = rows % n
    ks = tl.arange(0, BLOCK_K)
    aa = tl.arange(0, BLOCK_A)
    kmask = ks < K
    amask = aa < A
    dt = u_ptr.dtype.element_ty

    w_in = tl.load(w_in_ptr + br * K * A + ks[:, None] * A + aa[None, :],
                   mask=kmask[:, None] & amask[None, :], other=0.0).to(dt)  # [BLOCK_K, BLOCK_A]
    ut = tl.load(u_ptr + (br * B + b)[:, None] * stride_ub + j[:, None] * stride_un + t * stride_ut
                 + ks[None, :] * stride_uk, mask=rmask[:, None] & kmask[None, :], other=0.0)
    a = mma(ut, w_in, tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32), DOT_PREC, UPCAST_DOT)
    emb = (tl.load(b_in_ptr + br * A + aa, mask=amask, other=0.0).to(tl.float32)
           + tl.load(e_step_ptr + (br * T + t) * A + aa, mask=amask, other=0.0).to(tl.float32))
    a += emb[None, :]
    if HAS_TIME:
        tod = tl.load(tod_ptr + b * stride_tb + t * stride_tt, mask=rmask, other=0)
        dow = tl.load(dow_ptr + b * stride_tb + t * stride_tt, mask=rmask, other=0)
        # Out-of-range slots read nothing (callers validate; this keeps memory safe).
        emask = rmask[:, None] & amask[None, :]
        a += tl.load(e_tod_ptr + (br * S + tod[:, None]) * A + aa[None, :],
                     mask=emask & ((tod >= 0) & (tod < S))[:, None], other=0.0).to(tl.float32)
        a += tl.load(e_dow_ptr + (br * 7 + dow[:, None]) * A + aa[None, :],
                     mask=emask & ((dow >= 0) & (dow < 7))[:, None], other=0.0).to(tl.float32)
    g_rows = (br * B * n + rows).to(tl.int64) * (T * A) + t * A
    tl.store(g_ptr + g_rows[:, None] + aa[None, :], gelu(a).to(g_ptr.dtype.element_ty),
             mask=rmask[:, None] & amask[None, :])


@triton.jit
def _adapter_norm_kernel(
    y_ptr,  # [2, B*n, D] G @ W_out of each branch, contiguous
    b_out_ptr,  # [2, D] fp32
    ln_w_ptr,  # [2, D] fp32
    ln_b_ptr,  # [2, D] fp32
    pos_ptr,  # [n, D] patch position embedding, any strides
    z_ptr,  # [2B, P+n, D] out: this kernel writes rows P..P+n-1 of each sequence
    stride_pn, stride_pd,
    stride_zb, stride_zn, stride_zd,
    B, n, D, P, eps,
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # >= D: whole rows in registers
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    br = tl.program_id(1)
    rmask = rows < B * n
    b = rows // n
    j = rows % n
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m = rmask[:, None] & cmask[None, :]
    y_rows = (br * B * n + rows).to(tl.int64) * D
    y = tl.load(y_ptr + y_rows[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y += tl.load(b_out_ptr + br * D + cols, mask=cmask, other=0.0)[None, :]
    mean = tl.sum(tl.where(m, y, 0.0), axis=1) / D
    yc = tl.where(m, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / D + eps)
    ln_w = tl.load(ln_w_ptr + br * D + cols, mask=cmask, other=0.0)
    ln_b = tl.load(ln_b_ptr + br * D + cols, mask=cmask, other=0.0)
    pos = tl.load(pos_ptr + j[:, None] * stride_pn + cols[None, :] * stride_pd, mask=m, other=0.0)
    out = yc * rstd[:, None] * ln_w[None, :] + ln_b[None, :] + pos.to(tl.float32)
    z_rows = (br * B + b).to(tl.int64) * stride_zb + (P + j) * stride_zn
    tl.store(z_ptr + z_rows[:, None] + cols[None, :] * stride_zd, out.to(z_ptr.dtype.element_ty), mask=m)


def adapter_blocks(rows: int, K: int, A: int, D: int) -> tuple[dict, dict]:
    """Launch constants of the GELU and LayerNorm kernels for ``rows`` tokens per branch.

    tests/test_kernels_compile.py checks them with ptxas. The norm kernel holds whole rows: about
    8192 fp32 values per program (32 per thread at 8 warps).
    """
    gelu_blocks = {"BLOCK_M": 32 if rows <= 1024 else 64, "BLOCK_K": block(K), "BLOCK_A": block(A), "num_warps": 4}
    BLOCK_D = triton.next_power_of_2(D)
    norm_blocks = {"BLOCK_M": max(1, min(triton.next_power_of_2(rows), 8192 // BLOCK_D)), "BLOCK_D": BLOCK_D,
                   "num_warps": 8}
    return gelu_blocks, norm_blocks


@triton_op("stvfm::token_adapter", mutates_args=())
def token_adapter(u: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                  w_in: torch.Tensor, b_in: torch.Tensor, e_step: torch.Tensor,
                  e_tod: Optional[torch.Tensor], e_dow: Optional[torch.Tensor],
                  w_out: torch.Tensor, b_out: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
                  pos: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``u [2B, n, T, K]`` -> ``[2B, P+n, D]`` in ``u.dtype`` (weights as :func:`adapter_weights` stacks them).

    ``tod``/``dow`` int64 ``[B, T]`` with the same strides go with ``e_tod [2, S, A]``/``e_dow [2, 7, A]``
    (all four or none); ``w_in [2, K, A]`` and ``w_out [2, T*A, D]`` in ``u.dtype``; ``pos [n, D]`` and
    ``prefix [P, D]`` (prefix tokens plus their position embedding, ``P`` may be 0) in any strides.
    """
    check_device(_adapter_gelu_kernel, u)
    check_dtype(u, "u")
    if u.dim() != 4 or u.shape[0] % 2:
        raise KernelArgError(f"token_adapter: u must be [2B, n, T, K], got {list(u.shape)}")
    B2, n, T, K = u.shape
    B = B2 // 2
    A, D, P = w_in.shape[-1], w_out.shape[-1], prefix.shape[0]
    has_time = tod is not None
    if has_time != (dow is not None) or has_time != (e_tod is not None) or has_time != (e_dow is not None):
        raise KernelArgError("token_adapter: pass tod, dow, e_tod and e_dow together, or none of them")
    S = e_tod.shape[1] if has_time else 0
    check_args("token_adapter", u, {
        "w_in": (w_in, (2, K, A)), "b_in": (b_in, (2, A)), "e_step": (e_step, (2, T, A)),
        "e_tod": (e_tod, (2, S, A)), "e_dow": (e_dow, (2, 7, A)), "w_out": (w_out, (2, T * A, D)),
        "b_out": (b_out, (2, D)), "ln_w": (ln_w, (2, D)), "ln_b": (ln_b, (2, D)), "pos": (pos, (n, D)),
        "prefix": (prefix, (P, D)), "tod": (tod, (B, T)), "dow": (dow, (B, T))},
        any_strides=("pos", "prefix", "tod", "dow"))
    if w_in.dtype != u.dtype or w_out.dtype != u.dtype:
        raise KernelArgError(f"token_adapter: w_in and w_out must be {u.dtype} like u, got {w_in.dtype} and "
                             f"{w_out.dtype} (adapter_weights(..., dtype) prepares them)")
    if has_time and (dow.stride() != tod.stride() or tod.dtype != torch.int64 or dow.dtype != torch.int64):
        raise KernelArgError(f"token_adapter: tod and dow must be int64 with the same strides, got {tod.dtype} "
                             f"{list(tod.stride())} and {dow.dtype} {list(dow.stride())}")
    gelu_blocks, norm_blocks = adapter_blocks(B * n, K, A, D)
    g = torch.empty(2, B * n, T * A, dtype=u.dtype, device=u.device)
    wrap_triton(_adapter_gelu_kernel)[(triton.cdiv(B * n, gelu_blocks["BLOCK_M"]), T, 2)](
        u, tod if has_time else b_in, dow if has_time else b_in,  # any pointer: never read when HAS_TIME is False
        w_in, b_in, e_step, e_tod if has_time else b_in, e_dow if has_time else b_in, g,
        *u.stride(),
        tod.stride(0) if has_time else 0, tod.stride(1) if has_time else 0,
        B, n, T, K, A, S,
        HAS_TIME=has_time, **gelu_blocks, **dot_flags(_adapter_gelu_kernel, u.dtype),
    )
    y = torch.bmm(g, w_out)  # [2, B*n, D]: the one large matmul, on the library GEMM
    z = torch.empty(B2, P + n, D, dtype=u.dtype, device=u.device)
    if P:
        z[:, :P].copy_(prefix.to(u.dtype).unsqueeze(0).expand(B2, P, D))
    wrap_triton(_adapter_norm_kernel)[(triton.cdiv(B * n, norm_blocks["BLOCK_M"]), 2)](
        y, b_out, ln_w, ln_b, pos, z,
        *pos.stride(), *z.stride(),
        B, n, D, P, LN_EPS,
        **norm_blocks,
    )
    return z


def adapter_weights(adapter_r: TokenAdapter, adapter_f: TokenAdapter,
                    dtype: torch.dtype = torch.float32) -> dict[str, Optional[torch.Tensor]]:
    """The two adapters' weights stacked ``[2, ...]`` as :func:`token_adapter` takes them.

    The matmul weights are in ``dtype`` (the compute precision); biases, embeddings and LayerNorm
    parameters stay fp32.
    """
    def stack(fn, dt=torch.float32):
        return torch.stack([fn(adapter_r), fn(adapter_f)]).to(dt).contiguous()

    has_time = adapter_r.tod_embed is not None
    return {
        "w_in": stack(lambda m: m.w_in.weight.t(), dtype),
        "b_in": stack(lambda m: m.w_in.bias),
        "e_step": stack(lambda m: m.step_embed),
        "e_tod": stack(lambda m: m.tod_embed) if has_time else None,
        "e_dow": stack(lambda m: m.dow_embed) if has_time else None,
        "w_out": stack(lambda m: m.w_out.weight.t(), dtype),
        "b_out": stack(lambda m: m.w_out.bias),
        "ln_w": stack(lambda m: m.norm.weight),
        "ln_b": stack(lambda m: m.norm.bias),
    }


def token_adapter_ref(u, tod, dow, w_in, b_in, e_step, e_tod, e_dow, w_out, b_out, ln_w, ln_b,
                      pos, prefix) -> torch.Tensor:
    """Plain PyTorch reference of :func:`token_adapter`, same arguments, fp32 math."""
    B = u.shape[0] // 2
    T, A = e_step.shape[1:]
    out = []
    for br in range(2):
        a = u[br * B:(br + 1) * B].float() @ w_in[br].float() + b_in[br] + e_step[br]  # [B, n, T, A]
        if tod is not None:
            a = a + (e_tod[br][tod] + e_dow[br][dow]).unsqueeze(1)
        y = F.gelu(a).flatten(2) @ w_out[br].float() + b_out[br]
        z = F.layer_norm(y, y.shape[-1:], ln_w[br], ln_b[br], LN_EPS) + pos.float()
        out.append(torch.cat([prefix.float().expand(B, -1, -1), z], dim=1))
    return torch.cat(out, dim=0).to(u.dtype)
