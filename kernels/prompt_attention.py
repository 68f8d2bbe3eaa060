"""Bilateral Cross-Prompt Coordination (stage 5): prompt conditioning and the bilateral step.

Two ops over the backbone's output ``h [2B, n, D]`` (raw branch rows ``0..B-1``, flow branch rows
``B..2B-1``):

* ``torch.ops.stvfm.prompt_condition``: ``Q_x = P_x + MHA(LN(P_x), LN(H_x))`` for both branches
  (``M`` prompt queries over ``n`` tokens), returns ``Q [2B, M, D]`` (fp32);
* ``torch.ops.stvfm.bilateral_attention``: ``H_r' = H_r + MHA(LN(H_r), LN(Q_f))`` and
  ``H_f' = H_f + MHA(LN(H_f), LN(Q_r))`` in one launch, written side by side as
  ``concat(H_r', H_f') [B, n, 2D]``, the fusion layer's input.

Both fold the projections that act on the ``M`` prompts into the prompts, so that no ``D x D``
projection runs per token. Conditioning: ``q_h . k_h(x) = (q_h W_k,h) . LN(x) + const`` (the constant
drops out of the softmax over tokens) and ``sum_j p_j v_h(x_j) = W_v,h (sum_j p_j LN(x_j)) + b_v,h``;
two kernels compute the logits of ``A = scale q_h W_k,h [heads, M, D]`` (prepared once from the
weights) against every token, then the softmax over tokens and ``sum_j p_j LN(x_j)``; the ``M``-row
projections that follow are small PyTorch matmuls inside the op. Bilateral step: ``q_h(x) . k_h = LN(x) . (W_q,h^T k_h) + b_q,h . k_h``
and ``sum_{h,m} p_hm W_p,h v_h,m``, so each token needs one ``[D] x [D, heads*M]`` matmul, a softmax over
the ``M`` prompts of each head (in registers), and one ``[heads*M] x [heads*M, D]`` matmul. LayerNorm
statistics and softmax are fp32 at every precision. The folding reassociates sums, so fp32 results
match the unfolded reference to ~1e-7 relative, not bit for bit.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from stvfm_engine.kernels.common import KernelArgError, block, check_args, check_device, check_dtype, dot_flags, mma
from stvfm_engine.model.stvfm import LN_EPS, CrossPromptCoordination

LOG2E = 1.4426950408889634  # softmax via exp2: the logits are prescaled by log2(e)


def _check_features(op: str, h: torch.Tensor) -> None:
    if h.dim() != 3 or h.shape[0] % 2:
        raise KernelArgError(f"{op}: h must be [2B, n, D] (raw branch rows first), got {list(h.shape)}")


# ----------------------------------------------------------------------------- prompt conditioning
@triton.jit
def _row_stats(rows_ptr, rmask, stride_d, D, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """LayerNorm mean and 1/std of ``BLOCK_R`` rows of length ``D`` (fp32, two passes over D)."""
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        x = tl.load(rows_ptr + cols[None, :] * stride_d, mask=rmask[:, None] & (cols < D)[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=1)
    mean = acc / D
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        m = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(rows_ptr + cols[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, x - mean[:, None], 0.0)
        acc += tl.sum(xc * xc, axis=1)
    return mean, 1.0 / tl.sqrt(acc / D + eps)


@triton.jit
def _layer_norm_tile(x_ptrs, m, cols, cmask, mean, rstd, ln_w_ptr, ln_b_ptr):
    """``LN(x)`` of a ``[rows, cols]`` tile whose row statistics are known (fp32, 0 outside ``m``)."""
    x = tl.load(x_ptrs, mask=m, other=0.0).to(tl.float32)
    ln_w = tl.load(ln_w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return tl.where(m, (x - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :], 0.0)


@triton.jit
def _condition_scores_kernel(
    h_ptr,  # [2B, n, D] backbone features, any strides
    a_ptr,  # [2, Q, D] folded queries (Q = heads*M rows (head, prompt)) of each branch, contiguous
    ln_w_ptr,  # [2, D] LayerNorm (kv side) of each branch's conditioning module
    ln_b_ptr,  # [2, D]
    s_ptr,  # [2B, Q, n] fp32 out: logits (base 2) a_q . LN(h_j)
    stats_ptr,  # [2B, n, 2] fp32 out: mean and 1/std of each token row
    stride_hb, stride_hn, stride_hd,
    B, n, D, Q, eps,
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_Q: tl.constexpr,  # query rows per step
    BLOCK_D: tl.constexpr,  # columns per chunk of D
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seq = tl.program_id(1)
    br = seq // B
    tmask = tok < n
    qq = tl.arange(0, BLOCK_Q)
    dd = tl.arange(0, BLOCK_D)
    dt = h_ptr.dtype.element_ty
    h_rows = h_ptr + seq * stride_hb + tok[:, None] * stride_hn
    mean, rstd = _row_stats(h_rows, tmask, stride_hd, D, eps, BLOCK_N, BLOCK_D)
    tl.store(stats_ptr + (seq * n + tok) * 2, mean, mask=tmask)
    tl.store(stats_ptr + (seq * n + tok) * 2 + 1, rstd, mask=tmask)
    for q0 in range(0, Q, BLOCK_Q):
        rows = q0 + qq
        s = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + dd
            cmask = cols < D
            xn = _layer_norm_tile(h_rows + cols[None, :] * stride_hd, tmask[:, None] & cmask[None, :], cols,
                                  cmask, mean, rstd, ln_w_ptr + br * D, ln_b_ptr + br * D)
            a = tl.load(a_ptr + (br * Q + rows[:, None]) * D + cols[None, :],
                        mask=(rows < Q)[:, None] & cmask[None, :], other=0.0).to(dt)  # [BLOCK_Q, BLOCK_D]
            s = mma(a, tl.trans(xn.to(dt)), s, DOT_PREC, UPCAST_DOT)
        tl.store(s_ptr + (seq * Q + rows[:, None]) * n + tok[None, :], s,
                 mask=(rows < Q)[:, None] & tmask[None, :])


@triton.jit
def _condition_context_kernel(
    h_ptr,  # [2B, n, D] backbone features, any strides
    s_ptr,  # [2B, Q, n] fp32 logits from _condition_scores_kernel
    stats_ptr,  # [2B, n, 2] fp32 token-row mean and 1/std
    ln_w_ptr,  # [2, D]
    ln_b_ptr,  # [2, D]
    ctx_ptr,  # [2B, Q, D] fp32 out: sum_j softmax_j(s_qj) LN(h_j)
    stride_hb, stride_hn, stride_hd,
    B, n, D, Q,
    BLOCK_Q: tl.constexpr,  # query rows per program (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,  # tokens per step
    BLOCK_D: tl.constexpr,  # output columns per program
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    seq = tl.program_id(2)
    br = seq // B
    cmask = cols < D
    qmask = rows < Q
    nn = tl.arange(0, BLOCK_N)
    dt = h_ptr.dtype.element_ty
    s_rows = s_ptr + (seq * Q + rows[:, None]) * n

    # Softmax statistics of each query row over the n tokens (fp32).
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        tok = j0 + nn
        s = tl.load(s_rows + tok[None, :], mask=qmask[:, None] & (tok < n)[None, :], other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    inv_l = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)  # padding rows have l = 0 (and p = 0)

    ctx = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        tok = j0 + nn
        tmask = tok < n
        s = tl.load(s_rows + tok[None, :], mask=qmask[:, None] & tmask[None, :], other=float("-inf"))
        p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
        mean = tl.load(stats_ptr + (seq * n + tok) * 2, mask=tmask, other=0.0)
        rstd = tl.load(stats_ptr + (seq * n + tok) * 2 + 1, mask=tmask, other=0.0)
        xn = _layer_norm_tile(h_ptr + seq * stride_hb + tok[:, None] * stride_hn + cols[None, :] * stride_hd,
                              tmask[:, None] & cmask[None, :], cols, cmask, mean, rstd,
                              ln_w_ptr + br * D, ln_b_ptr + br * D)
        ctx = mma(p.to(dt), xn.to(dt), ctx, DOT_PREC, UPCAST_DOT)
    tl.store(ctx_ptr + (seq * Q + rows[:, None]) * D + cols[None, :], ctx, mask=qmask[:, None] & cmask[None, :])


def condition_blocks(Q: int, D: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Launch constants of the two conditioning kernels (tests/test_kernels_compile.py checks them with ptxas)."""
    wide = dtype == torch.float32
    scores = {"BLOCK_N": 32, "BLOCK_Q": min(32 if wide else 64, block(Q)),
              "BLOCK_D": min(16 if wide else 32, block(D)), "num_warps": 8}
    context = {"BLOCK_Q": min(32, block(Q)), "BLOCK_N": 32, "BLOCK_D": min(128, block(D)), "num_warps": 8}
    return scores, context


@triton_op("stvfm::prompt_condition", mutates_args=())
def prompt_condition(h: torch.Tensor, a: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
                     w_v: torch.Tensor, b_v: torch.Tensor, w_p: torch.Tensor, b_p: torch.Tensor,
                     prompts: torch.Tensor) -> torch.Tensor:
    """``h [2B, n, D]`` -> ``Q [2B, M, D]`` fp32 (``Q_r`` rows first), weights from :func:`condition_weights`.

    Two launches: logits of the ``heads*M`` folded queries against every token (with the token rows'
    LayerNorm statistics), then softmax over tokens and the context rows, tiled over ``D``.
    """
    check_device(_condition_scores_kernel, h)
    check_dtype(h, "h")
    _check_features("prompt_condition", h)
    B2, n, D = h.shape
    B = B2 // 2
    heads, M = a.shape[1], a.shape[2]
    hd, Q = D // heads, heads * M
    check_args("prompt_condition", h, {
        "a": (a, (2, heads, M, D)), "ln_w": (ln_w, (2, D)), "ln_b": (ln_b, (2, D)), "w_v": (w_v, (2, D, D)),
        "b_v": (b_v, (2, D)), "w_p": (w_p, (2, D, D)), "b_p": (b_p, (2, D)), "prompts": (prompts, (2, M, D))})
    s = torch.empty(B2, Q, n, dtype=torch.float32, device=h.device)
    stats = torch.empty(B2, n, 2, dtype=torch.float32, device=h.device)
    ctx = torch.empty(B2, Q, D, dtype=torch.float32, device=h.device)
    flags = dot_flags(_condition_scores_kernel, h.dtype)
    scores_blocks, context_blocks = condition_blocks(Q, D, h.dtype)
    wrap_triton(_condition_scores_kernel)[(triton.cdiv(n, scores_blocks["BLOCK_N"]), B2)](
        h, a, ln_w, ln_b, s, stats,
        *h.stride(),
        B, n, D, Q, LN_EPS,
        **scores_blocks, **flags,
    )
    grid = (triton.cdiv(D, context_blocks["BLOCK_D"]), triton.cdiv(Q, context_blocks["BLOCK_Q"]), B2)
    wrap_triton(_condition_context_kernel)[grid](
        h, s, stats, ln_w, ln_b, ctx,
        *h.stride(),
        B, n, D, Q,
        **context_blocks, **flags,
    )
    # The M prompt rows: attention output W_v,h ctx_h + b_v,h, output projection, residual.
    ctx = ctx.view(2, B, heads, M, D)
    o = torch.einsum("rbhmd,rhed->rbmhe", ctx, w_v.view(2, heads, hd, D)) + b_v.view(2, 1, 1, heads, hd)
    out = torch.einsum("rbme,rde->rbmd", o.reshape(2, B, M, D), w_p) + b_p.view(2, 1, 1, D)
    return (prompts.view(2, 1, M, D) + out).reshape(B2, M, D)


@torch.no_grad()
def condition_weights(bcpc: CrossPromptCoordination, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Arguments of :func:`prompt_condition` from the model's module, stacked ``[2, ...]`` (r, f).

    The folded queries ``a`` are in ``dtype`` (the compute precision), everything else fp32.
    """
    a, ln_w, ln_b, w_v, b_v, w_p, b_p = [], [], [], [], [], [], []
    for prompts, mod in ((bcpc.prompts_r, bcpc.condition_r), (bcpc.prompts_f, bcpc.condition_f)):
        M, D = prompts.shape
        heads = mod.heads
        hd = D // heads
        q = mod.q(mod.norm_q(prompts.float())).view(M, heads, hd)
        w_k = mod.kv.weight[:D].float().view(heads, hd, D)
        a.append(torch.einsum("mhe,hed->hmd", q, w_k) * (hd ** -0.5 * LOG2E))
        ln_w.append(mod.norm_kv.weight)
        ln_b.append(mod.norm_kv.bias)
        w_v.append(mod.kv.weight[D:])
        b_v.append(mod.kv.bias[D:])
        w_p.append(mod.proj.weight)
        b_p.append(mod.proj.bias)

    def stack(ts, dt=torch.float32):
        return torch.stack([t.detach().float() for t in ts]).to(dt).contiguous()

    return {"a": stack(a, dtype), "ln_w": stack(ln_w), "ln_b": stack(ln_b), "w_v": stack(w_v),
            "b_v": stack(b_v), "w_p": stack(w_p), "b_p": stack(b_p),
            "prompts": stack([bcpc.prompts_r, bcpc.prompts_f])}


@torch.no_grad()
def prompt_condition_ref(h: torch.Tensor, bcpc: CrossPromptCoordination) -> torch.Tensor:
    """Plain PyTorch reference of :func:`prompt_condition`: the model's own ``condition`` in fp32."""
    B = h.shape[0] // 2
    q_r, q_f = bcpc.condition(h[:B].float(), h[B:].float())
    return torch.cat([q_r, q_f], dim=0)


# ----------------------------------------------------------------------------- bilateral step
@triton.jit
def _bilateral_kernel(
    h_ptr,  # [2B, n, D] backbone features, any strides
    kt_ptr,  # [2B, heads, M, D] per-sequence folded keys log2(e)*scale*W_q,h^T k_h,m, contiguous
    sb_ptr,  # [2B, heads, M] fp32 score bias log2(e)*scale*b_q,h . k_h,m, contiguous
    vt_ptr,  # [2B, heads, M, D] per-sequence folded values W_p,h v_h,m, contiguous
    ln_w_ptr,  # [2, D] LayerNorm (query side) of each branch's coordination module
    ln_b_ptr,  # [2, D]
    b_p_ptr,  # [2, D] output projection bias
    out_ptr,  # [B, n, 2D] out: concat(H_r', H_f') along the last axis
    stride_hb, stride_hn, stride_hd,
    stride_ob, stride_on, stride_od,
    B, n, D, M, heads, eps,
    M_PAD: tl.constexpr,  # power of two >= M
    HEADS_PAD: tl.constexpr,  # power of two >= heads, HEADS_PAD * M_PAD >= 16
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # columns per chunk of D
    DOT_PREC: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One program: BLOCK_M tokens of one sequence (branch br, sample b) against its heads*M prompt keys.
    j = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    seq = tl.program_id(1)
    br = seq // B
    b = seq % B
    rmask = j < n
    dd = tl.arange(0, BLOCK_D)
    c = tl.arange(0, HEADS_PAD * M_PAD)  # score column (head, prompt) = (c // M_PAD, c % M_PAD)
    cvalid = ((c // M_PAD) < heads) & ((c % M_PAD) < M)
    crow = (c // M_PAD) * M + c % M_PAD  # row of the [heads*M, D] key/value matrices
    dt = h_ptr.dtype.element_ty
    h_rows = h_ptr + seq * stride_hb + j[:, None] * stride_hn

    mean, rstd = _row_stats(h_rows, rmask, stride_hd, D, eps, BLOCK_M, BLOCK_D)

    # Scores of every head at once: LN(h) @ K~^T  [BLOCK_M, HEADS_PAD*M_PAD].
    s = tl.zeros([BLOCK_M, HEADS_PAD * M_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        cmask = cols < D
        xn = _layer_norm_tile(h_rows + cols[None, :] * stride_hd, rmask[:, None] & cmask[None, :], cols, cmask,
                              mean, rstd, ln_w_ptr + br * D, ln_b_ptr + br * D)
        kt = tl.load(kt_ptr + (seq * heads * M + crow[None, :]) * D + cols[:, None],
                     mask=cvalid[None, :] & cmask[:, None], other=0.0).to(dt)  # [BLOCK_D, HEADS_PAD*M_PAD]
        s = mma(xn.to(dt), kt, s, DOT_PREC, UPCAST_DOT)
    s += tl.load(sb_ptr + seq * heads * M + crow, mask=cvalid, other=0.0)[None, :]
    s = tl.where(cvalid[None, :], s, float("-inf"))

    # Softmax over the M prompts of each head, in registers.
    s3 = tl.reshape(s, [BLOCK_M, HEADS_PAD, M_PAD])
    mx = tl.max(s3, axis=2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # padding heads: all -inf
    e = tl.exp2(s3 - mx[:, :, None])
    den = tl.sum(e, axis=2)
    den = tl.where(den == 0.0, 1.0, den)
    p = tl.reshape(e / den[:, :, None], [BLOCK_M, HEADS_PAD * M_PAD]).to(dt)

    # out = h + p @ V~ + b_p, chunk by chunk, into this branch's half of the concatenation.
    out_rows = out_ptr + b * stride_ob + j[:, None] * stride_on
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + dd
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        vt = tl.load(vt_ptr + (seq * heads * M + crow[:, None]) * D + cols[None, :],
                     mask=cvalid[:, None] & cmask[None, :], other=0.0).to(dt)  # [HEADS_PAD*M_PAD, BLOCK_D]
        x = tl.load(h_rows + cols[None, :] * stride_hd, mask=m, other=0.0).to(tl.float32)
        b_p = tl.load(b_p_ptr + br * D + cols, mask=cmask, other=0.0).to(tl.float32)
        y = mma(p, vt, x + b_p[None, :], DOT_PREC, UPCAST_DOT)
        tl.store(out_rows + (br * D + cols[None, :]) * stride_od, y.to(out_ptr.dtype.element_ty), mask=m)


def bilateral_blocks(n: int, M: int, heads: int, D: int, dtype: torch.dtype) -> dict:
    """Launch constants of the bilateral kernel (tests/test_kernels_compile.py checks them with ptxas)."""
    M_PAD = triton.next_power_of_2(M)
    return {"M_PAD": M_PAD, "HEADS_PAD": max(triton.next_power_of_2(heads), 16 // M_PAD),
            "BLOCK_M": 16 if dtype == torch.float32 else (32 if n < 512 else 64),
            "BLOCK_D": min(32, block(D)), "num_warps": 4 if dtype == torch.float32 else 8}


@triton_op("stvfm::bilateral_attention", mutates_args=())
def bilateral_attention(h: torch.Tensor, q: torch.Tensor, ln_q_w: torch.Tensor, ln_q_b: torch.Tensor,
                        ln_kv_w: torch.Tensor, ln_kv_b: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor,
                        w_kv: torch.Tensor, b_kv: torch.Tensor, w_p: torch.Tensor, b_p: torch.Tensor,
                        heads: int) -> torch.Tensor:
    """``h [2B, n, D]``, ``Q [2B, M, D]`` -> ``concat(H_r', H_f') [B, n, 2D]`` in ``h.dtype``.

    Weights from :func:`coordination_weights` (``[2, ...]``, module r then f, fp32).
    """
    check_device(_bilateral_kernel, h)
    check_dtype(h, "h")
    _check_features("bilateral_attention", h)
    B2, n, D = h.shape
    B = B2 // 2
    M = q.shape[1]
    if heads < 1 or D % heads:
        raise KernelArgError(f"bilateral_attention: heads must divide D = {D}, got {heads}")
    hd = D // heads
    vec = (2, D)
    check_args("bilateral_attention", h, {
        "q": (q, (B2, M, D)), "ln_q_w": (ln_q_w, vec), "ln_q_b": (ln_q_b, vec), "ln_kv_w": (ln_kv_w, vec),
        "ln_kv_b": (ln_kv_b, vec), "w_q": (w_q, (2, D, D)), "b_q": (b_q, vec), "w_kv": (w_kv, (2, 2 * D, D)),
        "b_kv": (b_kv, (2, 2 * D)), "w_p": (w_p, (2, D, D)), "b_p": (b_p, vec)}, any_strides=("q",))
    # Per-sequence keys and values from the other branch's prompts (M rows each, fp32).
    q_other = torch.cat([q[B:], q[:B]]).float().view(2, B, M, D)
    kv_in = torch.stack([F.layer_norm(q_other[r], (D,), ln_kv_w[r], ln_kv_b[r], LN_EPS) for r in range(2)])
    kv = torch.einsum("rbmd,red->rbme", kv_in, w_kv) + b_kv.view(2, 1, 1, 2 * D)
    k = kv[..., :D].reshape(2, B, M, heads, hd)
    v = kv[..., D:].reshape(2, B, M, heads, hd)
    scale = hd ** -0.5 * LOG2E
    kt = torch.einsum("rbmhe,rhed->rbhmd", k, w_q.view(2, heads, hd, D)) * scale
    sb = torch.einsum("rbmhe,rhe->rbhm", k, b_q.view(2, heads, hd)) * scale
    vt = torch.einsum("rbmhe,rdhe->rbhmd", v, w_p.view(2, D, heads, hd))
    out = torch.empty(B, n, 2 * D, dtype=h.dtype, device=h.device)
    blocks = bilateral_blocks(n, M, heads, D, h.dtype)
    wrap_triton(_bilateral_kernel)[(triton.cdiv(n, blocks["BLOCK_M"]), B2)](
        h, kt.to(h.dtype).contiguous(), sb.contiguous(), vt.to(h.dtype).contiguous(),
        ln_q_w, ln_q_b, b_p, out,
        *h.stride(), *out.stride(),
        B, n, D, M, heads, LN_EPS,
        **blocks,
        **dot_flags(_bilateral_kernel, h.dtype),
    )
    return out


@torch.no_grad()
def coordination_weights(bcpc: CrossPromptCoordination) -> dict[str, torch.Tensor]:
    """Arguments of :func:`bilateral_attention` from the model's module, stacked ``[2, ...]`` (r, f), fp32."""
    mods = (bcpc.coordinate_r, bcpc.coordinate_f)

    def stack(fn):
        return torch.stack([fn(m).detach().float() for m in mods]).contiguous()

    return {"ln_q_w": stack(lambda m: m.norm_q.weight), "ln_q_b": stack(lambda m: m.norm_q.bias),
            "ln_kv_w": stack(lambda m: m.norm_kv.weight), "ln_kv_b": stack(lambda m: m.norm_kv.bias),
            "w_q": stack(lambda m: m.q.weight), "b_q": stack(lambda m: m.q.bias),
            "w_kv": stack(lambda m: m.kv.weight), "b_kv": stack(lambda m: m.kv.bias),
            "w_p": stack(lambda m: m.proj.weight), "b_p": stack(lambda m: m.proj.bias),
            "heads": mods[0].heads}


@torch.no_grad()
def bilateral_attention_ref(h: torch.Tensor, q: torch.Tensor, bcpc: CrossPromptCoordination) -> torch.Tensor:
    """Plain PyTorch reference of :func:`bilateral_attention`: the model's own ``coordinate`` in fp32."""
    B = h.shape[0] // 2
    h_r, h_f = bcpc.coordinate(h[:B].float(), h[B:].float(), q[:B].float(), q[B:].float())
    return torch.cat([h_r, h_f], dim=-1)
