"""Temporal-Aware Token Adapter (stage 3) for both branches in one launch.

``torch.ops.stvfm.token_adapter`` computes, for every token of ``u [2B, n, T, K]`` (raw branch rows
``0..B-1`` through adapter r, flow branch rows ``B..2B-1`` through adapter f)::

    a = u @ W_in + b_in + E_step[t] (+ E_tod[tod_t] + E_dow[dow_t])      # [.., T, A]
    z = LayerNorm(GELU(a).flatten(T, A) @ W_out + b_out) + pos            # [.., D]

and writes the backbone's input ``[2B, P+n, D]``: the ``P`` prefix tokens (with their position
embedding) followed by the ``n`` adapted tokens, so the backbone needs no concatenation.
Stacked weights are prepared once by :func:`adapter_weights`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from stvfm_engine.kernels.common import block, check_device, check_dtype, dot_flags, gelu, mma
from stvfm_engine.model.stvfm import LN_EPS, TokenAdapter


@triton.jit
def _token_adapter_kernel(
    u_ptr,  # [2B, n, T, K] tokens of both branches
    tod_ptr,  # [B, T] int64 time-of-day slots (read only if HAS_TIME)
    dow_ptr,  # [B, T] int64 days of week (read only if HAS_TIME)
    w_in_ptr,  # [2, K, A] W_in^T of each branch, contiguous
    b_in_ptr,  # [2, A]
    e_step_ptr,  # [2, T, A] step embeddings
    e_tod_ptr,  # [2, S, A] time-of-day embeddings (read only if HAS_TIME)
    e_dow_ptr,  # [2, 7, A] day-of-week embeddings (read only if HAS_TIME)
    w_out_ptr,  # [2, T*A, D] W_out^T, contiguous
    b_out_ptr,  # [2, D]
    ln_w_ptr,  # [2, D]
    ln_b_ptr,  # [2, D]
    pos_ptr,  # [n, D] patch position embedding
    z_ptr,  # [2B, P+n, D] out: this kernel writes rows P..P+n-1 of each sequence
    stride_ub, stride_un, stride_ut, stride_uk,
    stride_tb, stride_tt,  # tod and dow
    stride_pn, stride_pd,
    stride_zb, stride_zn, stride_zd,
    B, n, T, K, A, D, S, P, eps,
    HAS_TIME: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_K: tl.constexpr,  # >= K
    BLOCK_A: tl.constexpr,  # >= A
    BLOCK_D: tl.constexpr,  # output columns per chunk
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    br = tl.program_id(1)  # 0: raw branch / adapter r, 1: flow branch / adapter f
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # over the branch's B*n tokens
    rmask = rows < B * n
    b = rows // n
    j = rows % n
    seq = br * B + b
    ks = tl.arange(0, BLOCK_K)
    aa = tl.arange(0, BLOCK_A)
    dd = tl.arange(0, BLOCK_D)
    kmask = ks < K
    amask = aa < A
    dt = u_ptr.dtype.element_ty

    w_in = tl.load(w_in_ptr + br * K * A + ks[:, None] * A + aa[None, :],
                   mask=kmask[:, None] & amask[None, :], other=0.0).to(dt)  # [BLOCK_K, BLOCK_A]
    b_in = tl.load(b_in_ptr + br * A + aa, mask=amask, other=0.0).to(tl.float32)
    u_ptrs = u_ptr + seq[:, None] * stride_ub + j[:, None] * stride_un + ks[None, :] * stride_uk
    z_rows = z_ptr + seq[:, None] * stride_zb + (P + j[:, None]) * stride_zn

    # Pass 1, per chunk of D output columns: y = GELU(a) @ W_out + b_out, stored into z (pre-LN),
    # with the row statistics merged across chunks (Chan et al.) in fp32. GELU(a) is recomputed per
    # chunk: its matmul is K/BLOCK_D of the W_out one.
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    done = tl.zeros([BLOCK_M], dtype=tl.float32)  # columns merged so far
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        cmask = cols < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for t in range(T):
            ut = tl.load(u_ptrs + t * stride_ut, mask=rmask[:, None] & kmask[None, :], other=0.0)
            a = mma(ut, w_in, tl.zeros([BLOCK_M, BLOCK_A], dtype=tl.float32), DOT_PREC, UPCAST_DOT)
            emb = b_in + tl.load(e_step_ptr + (br * T + t) * A + aa, mask=amask, other=0.0).to(tl.float32)
            a += emb[None, :]
            if HAS_TIME:
                tod = tl.load(tod_ptr + b * stride_tb + t * stride_tt, mask=rmask, other=0)
                dow = tl.load(dow_ptr + b * stride_tb + t * stride_tt, mask=rmask, other=0)
                # Out-of-range slots read nothing (callers validate; this keeps memory safe).
                emask = rmask[:, None] & amask[None, :]
                a += tl.load(e_tod_ptr + (br * S + tod[:, None]) * A + aa[None, :],
                             mask=emask & ((tod >= 0) & (tod < S))[:, None], other=0.0)
                a += tl.load(e_dow_ptr + (br * 7 + dow[:, None]) * A + aa[None, :],
                             mask=emask & ((dow >= 0) & (dow < 7))[:, None], other=0.0)
            g = gelu(a).to(dt)
            w_out = tl.load(w_out_ptr + br * T * A * D + (t * A + aa[:, None]) * D + cols[None, :],
                            mask=amask[:, None] & cmask[None, :], other=0.0).to(dt)  # [BLOCK_A, BLOCK_D]
            acc = mma(g, w_out, acc, DOT_PREC, UPCAST_DOT)
        y = acc + tl.load(b_out_ptr + br * D + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        cnt = tl.sum(cmask.to(tl.float32), axis=0)
        c_mean = tl.sum(tl.where(cmask[None, :], y, 0.0), axis=1) / cnt
        c_m2 = tl.sum(tl.where(cmask[None, :], (y - c_mean[:, None]) * (y - c_mean[:, None]), 0.0), axis=1)
        delta = c_mean - mean
        mean += delta * cnt / (done + cnt)
        m2 += c_m2 + delta * delta * done * cnt / (done + cnt)
        done += cnt
        tl.store(z_rows + cols[None, :] * stride_zd, y.to(z_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
    rstd = 1.0 / tl.sqrt(m2 / D + eps)

    tl.debug_barrier()  # pass 2 reads back what other threads of this program stored
    # Pass 2: z = (y - mean) * rstd * ln_w + ln_b + pos.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        y = tl.load(z_rows + cols[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
        ln_w = tl.load(ln_w_ptr + br * D + cols, mask=cmask, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + br * D + cols, mask=cmask, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + j[:, None] * stride_pn + cols[None, :] * stride_pd, mask=m, other=0.0)
        out = (y - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :] + pos.to(tl.float32)
        tl.store(z_rows + cols[None, :] * stride_zd, out.to(z_ptr.dtype.element_ty), mask=m)


def adapter_blocks(rows: int, K: int, A: int, D: int) -> dict:
    """Launch constants for ``rows`` tokens per branch (tests/test_kernels_compile.py checks them with ptxas)."""
    return {"BLOCK_M": 16 if rows <= 1024 else 32, "BLOCK_K": block(K), "BLOCK_A": block(A),
            "BLOCK_D": min(64, block(D)), "num_warps": 8}


@triton_op("stvfm::token_adapter", mutates_args=())
def token_adapter(u: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                  w_in: torch.Tensor, b_in: torch.Tensor, e_step: torch.Tensor,
                  e_tod: Optional[torch.Tensor], e_dow: Optional[torch.Tensor],
                  w_out: torch.Tensor, b_out: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
                  pos: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """``u [2B, n, T, K]`` -> ``[2B, P+n, D]`` in ``u.dtype`` (weights as :func:`adapter_weights` stacks them).

    ``tod``/``dow`` int64 ``[B, T]`` go with ``e_tod [2, S, A]``/``e_dow [2, 7, A]`` (all four or none);
    ``pos [n, D]``; ``prefix [P, D]`` (prefix tokens plus their position embedding, ``P`` may be 0).
    """
    check_device(_token_adapter_kernel, u)
    check_dtype(u, "u")
    B2, n, T, K = u.shape
    B = B2 // 2
    A, D, P = w_in.shape[2], w_out.shape[2], prefix.shape[0]
    has_time = tod is not None
    if has_time != (dow is not None) or has_time != (e_tod is not None) or has_time != (e_dow is not None):
        raise ValueError("token_adapter: pass tod, dow, e_tod and e_dow together, or none of them")
    z = torch.empty(B2, P + n, D, dtype=u.dtype, device=u.device)
    if P:
        z[:, :P].copy_(prefix.to(u.dtype).unsqueeze(0).expand(B2, P, D))
    tod_ = tod if has_time else b_in  # any pointer: never read when HAS_TIME is False
    dow_ = dow if has_time else b_in
    S = e_tod.shape[1] if has_time else 0
    blocks = adapter_blocks(B * n, K, A, D)
    grid = (triton.cdiv(B * n, blocks["BLOCK_M"]), 2)
    wrap_triton(_token_adapter_kernel)[grid](
        u, tod_, dow_, w_in, b_in, e_step,
        e_tod if has_time else b_in, e_dow if has_time else b_in,
        w_out, b_out, ln_w, ln_b, pos, z,
        *u.stride(),
        tod.stride(0) if has_time else 0, tod.stride(1) if has_time else 0,
        *pos.stride(), *z.stride(),
        B, n, T, K, A, D, S, P, LN_EPS,
        HAS_TIME=has_time,
        **blocks,
        **dot_flags(_token_adapter_kernel, u.dtype),
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
