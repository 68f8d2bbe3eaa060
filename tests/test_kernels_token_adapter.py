"""torch.ops.stvfm.token_adapter against its PyTorch reference and the model's TokenAdapter."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from stvfm_engine.kernels.token_adapter import adapter_weights, token_adapter_ref
from stvfm_engine.model.stvfm import TokenAdapter

SHAPES = [  # B, n, T, K, A, D, steps_per_day, prefix tokens
    (1, 7, 3, 3, 24, 40, 0, 1),
    (2, 13, 4, 12, 16, 150, 10, 2),
    (3, 28, 5, 8, 64, 192, 48, 1),
    (2, 9, 2, 27, 20, 72, 7, 0),
    (1, 35, 12, 2, 33, 130, 0, 5),
]


def case(B, n, T, K, A, D, S, P):
    adapters = [TokenAdapter(K, T, A, D, S) for _ in range(2)]
    with torch.no_grad():
        for m in adapters:
            for prm in m.parameters():
                prm.add_(0.3 * torch.randn_like(prm))
    u = torch.randn(2 * B, n, T, K)
    tod = torch.randint(0, S, (B, T)) if S else None
    dow = torch.randint(0, 7, (B, T)) if S else None
    return adapters, u, tod, dow, torch.randn(n, D), torch.randn(P, D)


def module_forward(adapters, u, tod, dow, pos, prefix, dtype):
    """The model's own TokenAdapters (in ``dtype``), with the prefix rows the op writes in front."""
    B = u.shape[0] // 2
    out = []
    with torch.no_grad():
        for br, m in enumerate(adapters):
            m = m.to(dtype)
            z = m(u[br * B:(br + 1) * B].to(dtype), tod, dow, pos.to(dtype).unsqueeze(0))
            out.append(torch.cat([prefix.to(dtype).expand(B, -1, -1), z], dim=1))
    return torch.cat(out).float()


@pytest.mark.parametrize("B,n,T,K,A,D,S,P", SHAPES)
def test_token_adapter_fp32(B, n, T, K, A, D, S, P):
    adapters, u, tod, dow, pos, prefix = case(B, n, T, K, A, D, S, P)
    w = adapter_weights(*adapters)
    z = torch.ops.stvfm.token_adapter(u, tod, dow, pos=pos, prefix=prefix, **w)
    assert z.shape == (2 * B, P + n, D) and z.dtype == torch.float32
    assert rel_err(z, token_adapter_ref(u, tod, dow, pos=pos, prefix=prefix, **w)) <= 1e-5
    assert rel_err(z, module_forward(adapters, u, tod, dow, pos, prefix, torch.float32)) <= 1e-5


def test_token_adapter_strided_tokens():
    adapters, u, tod, dow, pos, prefix = case(2, 10, 3, 4, 16, 48, 5, 1)
    w = adapter_weights(*adapters)
    ut = u.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ut.is_contiguous()
    z = torch.ops.stvfm.token_adapter(ut, tod, dow, pos=pos, prefix=prefix, **w)
    assert rel_err(z, token_adapter_ref(u, tod, dow, pos=pos, prefix=prefix, **w)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,n,T,K,A,D,S,P", SHAPES[:3])
def test_token_adapter_low_precision(B, n, T, K, A, D, S, P, dtype):
    adapters, u, tod, dow, pos, prefix = case(B, n, T, K, A, D, S, P)
    ref = module_forward(adapters, u, tod, dow, pos, prefix, torch.float32)
    z = torch.ops.stvfm.token_adapter(u.to(dtype), tod, dow, pos=pos, prefix=prefix, **adapter_weights(*adapters, dtype))
    assert z.dtype == dtype
    lowp = module_forward(adapters, u, tod, dow, pos, prefix, dtype)
    atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert ((z.float() - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()
