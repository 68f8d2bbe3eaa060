"""The bench side of the GPU path: bench/gpu_check's refusal without CUDA, the ``compile`` baseline's
plumbing, and the Triton stage breakdown (CUDA events on a GPU, the profiler in the interpreter)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import rel_err, write_checkpoint
from stvfm_engine.bench.roofline import STAGES
from stvfm_engine.bench.runner import make_inputs, open_variant
from stvfm_engine.bench.stages import triton_stage_runner
from stvfm_engine.engine import Engine
from stvfm_engine.engine.runtime import BackendError
from stvfm_engine.engine.triton_backend import load_triton_backend
from stvfm_engine.errors import STVFMError
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import build_model

GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check"
SMALL = STVFMConfig(backbone="vit_tiny_patch16_224", backbone_layers=1, history=4, horizon=2, channels=2, height=6,
                    width=6, patch=2, adapter_dim=16, prompts=3, steps_per_day=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: gpu_check would run in full")
def test_gpu_check_exits_2_without_cuda():
    assert os.access(GPU_CHECK, os.X_OK), "bench/gpu_check must be executable"
    started = time.perf_counter()
    out = subprocess.run([str(GPU_CHECK)], capture_output=True, text=True, timeout=10)
    assert time.perf_counter() - started < 10
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout.startswith("no CUDA device: ") and out.stdout.count("\n") == 1, out.stdout


def test_compile_baseline_opens_through_the_registry(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from stvfm_engine.export.build import build_engine

    engine = build_engine(write_checkpoint(tmp_path / "small.pt", SMALL), tmp_path / "small.engine",
                          backends=["onnxruntime"], max_batch=4, progress=False)
    with pytest.raises(BackendError, match="unknown backend 'compile'"):
        Engine.load(engine, backend="compile")  # a bench baseline, not something the Engine serves
    compiled = []
    # max-autotune takes minutes on this CPU: the compiler is replaced here, the plumbing around it is tested
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(kw) or module)
    baseline = open_variant(engine, "compile", None, None, "cpu")
    assert compiled == [{"mode": "max-autotune"}]
    assert (baseline.name, baseline.engine_dir, baseline.device) == ("compile/fp32", None, "cpu")
    eager = open_variant(engine, "eager", None, None, "cpu")
    x, tod, dow = make_inputs(SMALL, 3)
    y = baseline.predict(x, tod, dow)
    assert isinstance(y, np.ndarray) and rel_err(y, eager.predict(x, tod, dow)) <= 1e-6


def test_triton_stage_breakdown(device):
    model = build_model(SMALL, seed=1)
    rows = triton_stage_runner(model, "fp32", device, max_batch=2, iters=1, warmup=0)(2)
    timer = {"cpu": "torch.profiler", "cuda": "cuda_events"}[device]
    assert [r["stage"] for r in rows] == list(STAGES)
    assert all(r["runner"] == "triton" and r["batch"] == 2 and r["timer"] == timer for r in rows)
    assert all(r["ms"] > 0 for r in rows) and abs(sum(r["fraction"] for r in rows) - 1) < 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels are compiled wherever CUDA is (no interpreter to refuse)")
def test_cuda_graphs_need_cuda_and_compiled_kernels():
    with pytest.raises(STVFMError, match="CUDA graphs need a CUDA device"):
        load_triton_backend(build_model(SMALL, seed=1), "fp32", "cpu", cuda_graphs=True)
