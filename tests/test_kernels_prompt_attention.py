"""torch.ops.stvfm.prompt_condition / bilateral_attention against the model's CrossPromptCoordination.

On CUDA where present, else in Triton's interpreter.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import rel_err
from stvfm_engine.kernels.common import KernelArgError
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
PRESET_SHAPES = {"city": (256, 768, 8, 12), "large": (256, 1024, 8, 16)}  # n, D, M, heads



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


def weights(w: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in w.items()}


@pytest.mark.parametrize("B,n,D,M,heads", SHAPES)
def test_prompt_condition_fp32(device, B, n, D, M, heads):
    bcpc, h = case(B, n, D, M, heads)
    q = torch.ops.stvfm.prompt_condition(h.to(device), **weights(condition_weights(bcpc), device))
    assert q.shape == (2 * B, M, D) and q.dtype == torch.float32
    assert rel_err(q, prompt_condition_ref(h, bcpc)) <= 1e-5


@pytest.mark.parametrize("B,n,D,M,heads", SHAPES)
def test_bilateral_attention_fp32(device, B, n, D, M, heads):
    bcpc, h = case(B, n, D, M, heads)
    q = prompt_condition_ref(h, bcpc) + 0.5 * torch.randn(2 * B, M, D)
    out = torch.ops.stvfm.bilateral_attention(h.to(device), q.to(device), **weights(coordination_weights(bcpc), device))
    assert out.shape == (B, n, 2 * D) and out.dtype == torch.float32
    assert rel_err(out, bilateral_attention_ref(h, q, bcpc)) <= 1e-5


def check_low_precision(bcpc, h, dtype, device):
    """Both ops within ``2 |torch_lowp - ref32| + atol`` elementwise, torch_lowp on the kernel's device."""
    B = h.shape[0] // 2
    bcpc_lowp = copy.deepcopy(bcpc).to(device, dtype)
    hl = h.to(device, dtype)
    with torch.no_grad():
        q_ref = prompt_condition_ref(h, bcpc)
        q_lowp = torch.cat(bcpc_lowp.condition(hl[:B], hl[B:])).float().cpu()
        out_ref = bilateral_attention_ref(h, q_ref, bcpc)
        ql = q_ref.to(device, dtype)
        out_lowp = torch.cat(bcpc_lowp.coordinate(hl[:B], hl[B:], ql[:B], ql[B:]), -1).float().cpu()
    q = torch.ops.stvfm.prompt_condition(hl, **weights(condition_weights(bcpc, dtype), device))
    out = torch.ops.stvfm.bilateral_attention(hl, q_ref.to(device), **weights(coordination_weights(bcpc), device))
    assert q.dtype == torch.float32 and out.dtype == dtype
    for ours, ref, lowp in ((q, q_ref, q_lowp), (out, out_ref, out_lowp)):
        atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
        assert ((ours.float().cpu() - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,n,D,M,heads", SHAPES[2:4])
def test_prompt_attention_low_precision(device, B, n, D, M, heads, dtype):
    check_low_precision(*case(B, n, D, M, heads), dtype, device)


def test_prompt_attention_contract(device):
    bcpc, h = case(1, 5, 32, 3, 2)
    h = h.to(device)
    cw, kw = weights(condition_weights(bcpc), device), weights(coordination_weights(bcpc), device)
    with pytest.raises(KernelArgError, match="a must be contiguous"):
        torch.ops.stvfm.prompt_condition(h, **{**cw, "a": cw["a"].transpose(2, 3).contiguous().transpose(2, 3)})
    with pytest.raises(KernelArgError, match=r"ln_w must be \[2, 32\], got \[2, 31\]"):
        torch.ops.stvfm.prompt_condition(h, **{**cw, "ln_w": cw["ln_w"][:, 1:].contiguous()})
    with pytest.raises(KernelArgError, match=r"h must be \[2B, n, D\]"):
        torch.ops.stvfm.prompt_condition(h[:1], **cw)
    q = torch.zeros(2, 3, 32, device=device)
    with pytest.raises(KernelArgError, match="b_p must be contiguous"):
        torch.ops.stvfm.bilateral_attention(h, q, **{**kw, "b_p": torch.zeros(2, 64, device=device)[:, ::2]})
    with pytest.raises(KernelArgError, match="heads must divide D = 32"):
        torch.ops.stvfm.bilateral_attention(h, q, **{**kw, "heads": 3})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 17, 64])
@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_prompt_attention_presets_on_gpu(preset, B, dtype):
    check_low_precision(*case(B, *PRESET_SHAPES[preset]), dtype, "cuda")
