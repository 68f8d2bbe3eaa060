"""The ``triton`` backend against the fp32 reference model (on CUDA with graphs where present, else the interpreter)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import CONFIGS, rel_err
from stvfm_engine.engine.backends.triton import bucket_for, copy_padded, graph_buckets, load_triton_backend
from stvfm_engine.errors import InputError, STVFMError
from stvfm_engine.model.config import STVFMConfig, from_preset
from stvfm_engine.model.stvfm import build_model

OPS = ("stvfm::flow_patchify", "stvfm::token_adapter", "stvfm::prompt_condition", "stvfm::bilateral_attention")
MAX_BATCH = 4  # buckets 1, 2, 4: batch 3 runs padded

CASES = {  # small backbones, one block: odd grids, C != 2, patch 1-3, M 3-8, with and without time inputs
    "vit-tiny-time": CONFIGS["vit-tiny-c3-7x9-p2-T4-H2-day10"],
    "deit-distilled-notime": CONFIGS["deit-tiny-distilled-c2-5x6-p1-T3-H1-notime"],
    "reg-token-p3": CONFIGS["vit-wee-reg1-c1-10x8-p3-T5-H1-day48"],
}



def with_norm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config.channels
    model.set_normalization(torch.rand(c, generator=g) * 5, torch.rand(c, generator=g) * 2 + 0.5)
    return model


@pytest.fixture(scope="module")
def models():
    return {name: with_norm(build_model(cfg, seed=i), i) for i, (name, cfg) in enumerate(CASES.items())}


def inputs(cfg: STVFMConfig, B: int, device="cpu"):
    x = torch.randn(B, cfg.history, cfg.channels, cfg.height, cfg.width) * 2 + 3
    if not cfg.uses_time:
        return x.to(device), None, None
    tod = torch.randint(0, cfg.steps_per_day, (B, cfg.history))
    dow = torch.randint(0, 7, (B, cfg.history))
    return x.to(device), tod.to(device), dow.to(device)


def reference(model, x, tod, dow):
    """The fp32 reference output, computed where the model lives, returned on the CPU."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(*(None if t is None else t.to(dev) for t in (x, tod, dow))).cpu()


def check_low_precision(model, fn, x, tod, dow, dtype):
    """Within ``2 |torch_lowp - ref32| + atol`` elementwise and in norm; torch_lowp on ``fn``'s device."""
    ref = reference(model, x, tod, dow)
    lowp_model = copy.deepcopy(model).to(x.device, dtype)
    with torch.no_grad():
        lowp = lowp_model(x.to(dtype), tod, dow).float().cpu()
    y = fn(x, tod, dow)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    y = y.cpu()
    atol = 2 * torch.finfo(dtype).eps * ref.abs().max()
    assert ((y - ref).abs() <= 2 * (lowp - ref).abs() + atol).all()
    assert rel_err(y, ref) <= 2 * rel_err(lowp, ref) + 1e-3


# ----------------------------------------------------------------------------- pure choices
def test_graph_buckets_and_bucket_for():
    assert graph_buckets(1) == (1,)
    assert graph_buckets(4) == (1, 2, 4)
    assert graph_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    buckets = graph_buckets(48)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    with pytest.raises(InputError, match="batch 49 is larger than this predictor's max batch 48"):
        bucket_for(49, buckets)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(STVFMError, match="max_batch must be an integer >= 1"):
            graph_buckets(bad)


def test_copy_padded_zeroes_the_padding():
    dst = torch.full((4, 2), 7.0)
    src = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int64)  # converted like a real copy
    assert torch.equal(copy_padded(dst, src), torch.tensor([[1.0, 2], [3, 4], [5, 6], [0, 0]]))
    assert torch.equal(copy_padded(torch.empty(2, 2), src[:2]), src[:2].float())


def test_precision_defaults_on_load(models, device):
    # the registry's default (tests/test_resolve.py has the table): bf16 on CUDA, fp32 on a CPU
    fn = load_triton_backend(models["deit-distilled-notime"], device=device, max_batch=1)
    assert fn.dtype == {"cpu": torch.float32, "cuda": torch.bfloat16}[device]
    assert load_triton_backend(models["deit-distilled-notime"], "fp16", device, max_batch=1).dtype == torch.float16


# ----------------------------------------------------------------------------- numbers (CUDA or interpreter)
@pytest.mark.parametrize("name,B", [("vit-tiny-time", 2), ("deit-distilled-notime", 3), ("reg-token-p3", 1)])
def test_fp32_matches_reference(models, device, name, B):
    model = models[name]
    fn = load_triton_backend(model, "fp32", device, max_batch=MAX_BATCH)
    x, tod, dow = inputs(model.config, B, device)
    y = fn(x, tod, dow)
    ref = reference(model, x, tod, dow)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-4


def test_padded_rows_do_not_change_the_answer(models, device):
    model = models["vit-tiny-time"]
    fn = load_triton_backend(model, "fp32", device, max_batch=MAX_BATCH)
    x, tod, dow = inputs(model.config, 4, device)
    full = fn(x, tod, dow)  # bucket 4, no padding
    part = fn(x[:3], tod[:3], dow[:3])  # bucket 4, one zero row
    assert part.shape[0] == 3 and rel_err(part, full[:3]) <= 1e-6
    with pytest.raises(InputError, match="max batch 4"):
        fn(*inputs(model.config, 5, device))


def test_same_model_without_time_inputs(device):
    cfg = CASES["vit-tiny-time"].replace(steps_per_day=0)
    model = with_norm(build_model(cfg, seed=7))
    fn = load_triton_backend(model, "fp32", device, max_batch=2)
    x, tod, dow = inputs(cfg, 2, device)
    assert tod is None
    assert rel_err(fn(x), reference(model, x, None, None)) <= 1e-4


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("name", ["vit-tiny-time", "deit-distilled-notime"])
def test_low_precision_within_what_pytorch_loses(models, device, name, precision, dtype):
    # The interpreter runs both on a CPU (bf16 tl.dot operands are widened to fp32 there, see
    # kernels/common.py); on a GPU the same test runs the real tensor-core path.
    model = models[name]
    fn = load_triton_backend(model, precision, device, max_batch=2)
    check_low_precision(model, fn, *inputs(model.config, 2, device), dtype)


def test_profile_shows_the_fused_ops(models, device):
    model = models["vit-tiny-time"]
    fn = load_triton_backend(model, "fp32", device, max_batch=1)
    x, tod, dow = inputs(model.config, 1, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn.forward(x, tod, dow)  # not a graph replay: the ops' own calls
    names = {e.name for e in prof.events()}
    assert set(OPS) <= names, f"missing from the profile: {set(OPS) - names}"


def test_reference_model_is_left_untouched(models, device):
    model = models["deit-distilled-notime"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_triton_backend(model, "bf16", device, max_batch=1)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_refuses_unknown_precision_and_device(models):
    with pytest.raises(STVFMError, match="precision"):
        load_triton_backend(models["vit-tiny-time"], "int8", "cpu")
    with pytest.raises(STVFMError, match="not meta"):
        load_triton_backend(models["vit-tiny-time"], "fp32", "meta")


def test_refuses_cpu_without_the_interpreter_from_the_start():
    code = ("import os\n"
            "from stvfm_engine.engine.backends.triton import load_triton_backend\n"
            "from stvfm_engine.errors import STVFMError\n"
            "for step in ('unset', 'set late'):\n"
            "    try:\n        load_triton_backend(None, 'fp32', 'cpu')\n"
            "    except STVFMError as e:\n        print(step, 'refused:', e)\n"
            "    os.environ['TRITON_INTERPRET'] = '1'\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stderr[-2000:]
    assert lines[0].startswith("unset refused:") and "set TRITON_INTERPRET=1 before starting Python" in lines[0]
    assert lines[1].startswith("set late refused:") and "after stvfm_engine.kernels was imported" in lines[1]


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graphs_match_eager_and_reference(models, precision):
    model = models["vit-tiny-time"]
    fn = load_triton_backend(model, precision, "cuda", max_batch=8)
    assert fn.cuda_graphs and fn.compiled_backbone and sorted(fn._graphs) == [1, 2, 4, 8]
    outs = []
    for B in (2, 3, 8, 1, 3):  # padded buckets, then replays of the same ones
        x, tod, dow = inputs(model.config, B, device="cuda")
        y = fn(x, tod, dow)
        outs.append((y, y.clone(), reference(model, x, tod, dow), fn.forward(x, tod, dow)))
    tol = 1e-4 if precision == "fp32" else 2e-2
    for y, y_copy, ref, eager in outs:
        assert torch.equal(y, y_copy), "a later replay overwrote a returned output"
        assert rel_err(y, ref) <= tol
        assert rel_err(y, eager) <= (1e-5 if precision == "fp32" else 1e-2)


@pytest.mark.gpu
def test_graph_replay_across_batch_sizes_and_threads(models):
    model = models["reg-token-p3"]
    fn = load_triton_backend(model, "bf16", "cuda", max_batch=12)  # buckets 1, 2, 4, 8, 12
    cases = [inputs(model.config, B) for B in (1, 2, 3, 5, 7, 8, 9, 12, 4, 6, 11, 10)]  # CPU inputs: copied in
    expected = [fn(*case).cpu() for case in cases]
    failures = []

    def worker(seed):
        order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist() * 3
        side = torch.cuda.Stream()  # callers on other streams must not race on the static buffers
        with torch.cuda.stream(side):
            for i in order:
                y = fn(*cases[i]).cpu()
                if y.shape != expected[i].shape or rel_err(y, expected[i]) > 1e-6:
                    failures.append((seed, i))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(worker, range(6)))  # re-raises a worker's exception
    assert not failures
    for case, y in zip(cases, expected):
        assert rel_err(y, reference(model, *case)) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("preset", ["city", "large"])
def test_presets_on_gpu(preset, precision, dtype):
    # The preset's shapes (grid, patch, D, heads, tokens) with two backbone blocks, to keep it quick.
    model = with_norm(build_model(from_preset(preset, backbone_layers=2), seed=3)).cuda()
    fn = load_triton_backend(model, precision, "cuda", max_batch=64)
    for B in (1, 17, 64):
        check_low_precision(model, fn, *inputs(model.config, B, "cuda"), dtype)
