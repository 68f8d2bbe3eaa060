"""The bench side of the GPU path: the ``compile`` baseline's plumbing and the Triton stage breakdown (CUDA
events on a GPU, the profiler in the interpreter). The GPU check itself: tests/test_gpu_check.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import CONFIGS, rel_err, write_checkpoint
from stvfm_engine.bench.roofline import STAGES
from stvfm_engine.bench.runner import make_inputs, open_variant
from stvfm_engine.bench.stages import triton_stage_runner
from stvfm_engine.engine import Engine
from stvfm_engine.engine.backends.triton import load_triton_backend
from stvfm_engine.errors import BackendError, STVFMError
from stvfm_engine.model.stvfm import build_model

SMALL = CONFIGS["vit-tiny-c2-6x6-p2-T4-H2-day10"]


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
