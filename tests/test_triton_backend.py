"""The ``triton`` backend against the fp32 reference model (Triton interpreter on a CPU; CUDA graphs on a GPU)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from helpers import rel_err
from stvfm_engine.engine.triton_backend import load_triton_backend
from stvfm_engine.errors import InputError, STVFMError
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import build_model

OPS = ("stvfm::flow_patchify", "stvfm::token_adapter", "stvfm::prompt_condition", "stvfm::bilateral_attention")

CONFIGS = {  # small backbones, one block: odd grids, C != 2, patch 1-3, M 3-8, with and without time inputs
    "vit-tiny-time": STVFMConfig(backbone="vit_tiny_patch16_224", backbone_layers=1, history=4, horizon=2,
                                 channels=3, height=7, width=9, patch=2, adapter_dim=24, prompts=5,
                                 steps_per_day=10),
    "deit-distilled-notime": STVFMConfig(backbone="deit_tiny_distilled_patch16_224", backbone_layers=1,
                                         history=3, channels=2, height=5, width=6, patch=1, adapter_dim=16,
                                         prompts=3, steps_per_day=0),
    "reg-token-p3": STVFMConfig(backbone="vit_wee_patch16_reg1_gap_256", backbone_layers=1, history=5,
                                channels=1, height=10, width=8, patch=3, adapter_dim=20, prompts=8,
                                steps_per_day=48),
}


@pytest.fixture(scope="module")
def models():
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        m = build_model(cfg, seed=i)
        m.set_normalization(torch.rand(cfg.channels) * 5, torch.rand(cfg.channels) * 2 + 0.5)
        out[name] = m
    return out


def inputs(cfg: STVFMConfig, B: int, with_time: bool = True, device="cpu"):
    x = torch.randn(B, cfg.history, cfg.channels, cfg.height, cfg.width) * 2 + 3
    if not (cfg.uses_time and with_time):
        return x.to(device), None, None
    tod = torch.randint(0, cfg.steps_per_day, (B, cfg.history))
    dow = torch.randint(0, 7, (B, cfg.history))
    return x.to(device), tod.to(device), dow.to(device)


def reference(model, x, tod, dow):
    with torch.no_grad():
        return model(x.cpu(), None if tod is None else tod.cpu(), None if dow is None else dow.cpu())


@pytest.mark.parametrize("name,B", [("vit-tiny-time", 2), ("deit-distilled-notime", 3), ("reg-token-p3", 1)])
def test_fp32_matches_reference(models, name, B):
    model = models[name]
    fn = load_triton_backend(model, "fp32", "cpu")
    x, tod, dow = inputs(model.config, B)
    y = fn(x, tod, dow)
    ref = reference(model, x, tod, dow)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-4


def test_same_model_without_time_inputs():
    cfg = CONFIGS["vit-tiny-time"].replace(steps_per_day=0)
    model = build_model(cfg, seed=7)
    fn = load_triton_backend(model, "fp32", "cpu")
    x, tod, dow = inputs(cfg, 2)
    assert tod is None
    assert rel_err(fn(x), reference(model, x, None, None)) <= 1e-4


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("name", ["vit-tiny-time", "deit-distilled-notime"])
def test_low_precision_within_what_pytorch_loses(models, name, precision, dtype):
    # The interpreter runs both on a CPU (bf16 tl.dot operands are widened to fp32 there, see
    # kernels/common.py); on a GPU the same test runs the real tensor-core path.
    model = models[name]
    x, tod, dow = inputs(model.config, 2)
    ref = reference(model, x, tod, dow)
    lowp_model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        lowp = lowp_model(x.to(dtype), tod, dow).float()
    y = load_triton_backend(model, precision, "cpu")(x, tod, dow)
    assert y.dtype == torch.float32
    atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert ((y - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()
    assert rel_err(y, ref) <= 2 * rel_err(lowp, ref) + 1e-3


def test_profile_shows_the_fused_ops(models):
    model = models["vit-tiny-time"]
    fn = load_triton_backend(model, "fp32", "cpu")
    x, tod, dow = inputs(model.config, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(x, tod, dow)
    names = {e.name for e in prof.events()}
    assert set(OPS) <= names, f"missing from the profile: {set(OPS) - names}"


def test_reference_model_is_left_untouched(models):
    model = models["deit-distilled-notime"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_triton_backend(model, "bf16", "cpu")
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_input_errors(models):
    model = models["vit-tiny-time"]
    cfg = model.config
    fn = load_triton_backend(model, "fp32", "cpu")
    x, tod, dow = inputs(cfg, 2)
    with pytest.raises(InputError, match="time inputs"):
        fn(x)
    with pytest.raises(InputError, match=r"x must be"):
        fn(x[:, :-1], tod, dow)
    with pytest.raises(InputError, match=r"tod must be"):
        fn(x, tod[:, :-1], dow)
    with pytest.raises(InputError, match=r"dow values"):
        fn(x, tod, dow + 7)


def test_refuses_cpu_without_interpreter(models, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(STVFMError, match="TRITON_INTERPRET=1"):
        load_triton_backend(models["vit-tiny-time"], "fp32", "cpu")


def test_refuses_unknown_precision_and_device(models):
    with pytest.raises(STVFMError, match="precision"):
        load_triton_backend(models["vit-tiny-time"], "int8", "cpu")
    with pytest.raises(STVFMError, match="not meta"):
        load_triton_backend(models["vit-tiny-time"], "fp32", "meta")


def test_refuses_interpreter_set_after_import():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import stvfm_engine.kernels.flow\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from stvfm_engine.engine.triton_backend import load_triton_backend\n"
            "from stvfm_engine.errors import STVFMError\n"
            "try:\n    load_triton_backend(None, 'fp32', 'cpu')\n"
            "except STVFMError as e:\n    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "refused:" in out.stdout and "after stvfm_engine.kernels was imported" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- GPU only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs, compiled kernels)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graphs_match_eager_and_reference(models, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model = models["vit-tiny-time"]
    fn = load_triton_backend(model, precision, "cuda")
    assert fn.cuda_graphs
    outs = []
    for B in (2, 3, 2):  # a second capture, then a replay of the first
        x, tod, dow = inputs(model.config, B, device="cuda")
        y = fn(x, tod, dow)
        outs.append((y, y.clone(), reference(model, x, tod, dow), fn.forward(x, tod, dow)))
    tol = 1e-4 if precision == "fp32" else 2e-2
    for y, y_copy, ref, eager in outs:
        assert torch.equal(y, y_copy), "a later replay overwrote a returned output"
        assert rel_err(y.cpu(), ref) <= tol
        assert rel_err(y, eager) <= (1e-5 if precision == "fp32" else 1e-2)
