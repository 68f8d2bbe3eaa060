"""torch.ops.stvfm.prompt_condition / bilateral_attention against the model's CrossPromptCoordination."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import rel_err
from stvfm_engine.kernels.prompt_attention import (bilateral_attention_ref, condition_weights,
                                                   coordination_weights, prompt_condition_ref)
from stvfm_engine.model.stvfm import CrossPromptCoordination

SHAPES = [  # B, n, D, M, heads
    (1, 7, 40, 3, 2),
    (2, 13, 64, 5, 1),
    (3, 20, 96, 8, 3),
    (2, 33, 192, 8, 3),
    (1, 50, 128, 5, 4),
    (2, 45, 72, 13, 6),
]


def case(B, n, D, M, heads):
    bcpc = CrossPromptCoordination(D, M, heads).eval()
    with torch.no_grad():  # trained-like scales: softmax logits of order 1, LayerNorm affines not trivial
        for name, prm in bcpc.named_parameters():
            if name.startswith("prompts"):
                prm.normal_()
            elif prm.dim() == 2:
                prm.normal_(0.0, prm.shape[1] ** -0.5)
            else:
                prm.add_(0.3 * torch.randn_like(prm))
    h = torch.randn(2 * B, n + 1, D)[:, 1:]  # strided, like the backbone output without its prefix token
    return bcpc, h


@pytest.mark.parametrize("B,n,D,M,heads", SHAPES)
def test_prompt_condition_fp32(B, n, D, M, heads):
    bcpc, h = case(B, n, D, M, heads)
    q = torch.ops.stvfm.prompt_condition(h, **condition_weights(bcpc))
    assert q.shape == (2 * B, M, D) and q.dtype == torch.float32
    assert rel_err(q, prompt_condition_ref(h, bcpc)) <= 1e-5


@pytest.mark.parametrize("B,n,D,M,heads", SHAPES)
def test_bilateral_attention_fp32(B, n, D, M, heads):
    bcpc, h = case(B, n, D, M, heads)
    q = prompt_condition_ref(h, bcpc) + 0.5 * torch.randn(2 * B, M, D)
    out = torch.ops.stvfm.bilateral_attention(h, q, **coordination_weights(bcpc))
    assert out.shape == (B, n, 2 * D) and out.dtype == torch.float32
    assert rel_err(out, bilateral_attention_ref(h, q, bcpc)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,n,D,M,heads", SHAPES[2:4])
def test_prompt_attention_low_precision(B, n, D, M, heads, dtype):
    bcpc, h = case(B, n, D, M, heads)
    bcpc_lowp = copy.deepcopy(bcpc).to(dtype)
    hl = h.to(dtype)
    with torch.no_grad():
        q_ref = prompt_condition_ref(h, bcpc)
        q_lowp = torch.cat(bcpc_lowp.condition(hl[:B], hl[B:])).float()
        out_ref = bilateral_attention_ref(h, q_ref, bcpc)
        out_lowp = torch.cat(bcpc_lowp.coordinate(hl[:B], hl[B:], q_ref[:B].to(dtype), q_ref[B:].to(dtype)), -1).float()
    q = torch.ops.stvfm.prompt_condition(hl, **condition_weights(bcpc, dtype))
    out = torch.ops.stvfm.bilateral_attention(hl, q_ref, **coordination_weights(bcpc))
    assert q.dtype == torch.float32 and out.dtype == dtype
    for ours, ref, lowp in ((q, q_ref, q_lowp), (out.float(), out_ref, out_lowp)):
        atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
        assert ((ours - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()
