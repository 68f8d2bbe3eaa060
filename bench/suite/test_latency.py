"""pytest-benchmark suite: per-call latency of each CPU backend and of the eager stages, for regression
tracking (``pytest bench/suite --benchmark-only``; see bench/README.md).

pytest-benchmark times one benchmark after another, not interleaved: compare backends with
``stvfm-engine bench`` (interleaved in blocks); use this suite to compare a backend with itself
across commits (``--benchmark-autosave`` / ``--benchmark-compare``).
"""
from __future__ import annotations

import os

import pytest
import torch

from stvfm_engine.bench.runner import make_inputs
from stvfm_engine.bench.stages import staged_forward
from stvfm_engine.model.checkpoint import save_checkpoint
from stvfm_engine.model.config import from_preset
from stvfm_engine.model.stvfm import build_model

PRESET = os.environ.get("STVFM_BENCH_PRESET", "tiny")
THREADS = int(os.environ.get("STVFM_BENCH_THREADS", "2"))


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory):
    from stvfm_engine.export.build import build_engine

    torch.set_num_threads(THREADS)
    d = tmp_path_factory.mktemp("suite")
    ckpt = save_checkpoint(build_model(from_preset(PRESET), seed=0), d / f"{PRESET}.pt")
    return build_engine(ckpt, d / "fp32.engine", backends=["onnxruntime"], progress=False), ckpt


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_predict(benchmark, engine_dir, backend, batch):
    from stvfm_engine import Engine

    engine = Engine.load(engine_dir[0], backend=backend, threads=THREADS)
    x, tod, dow = make_inputs(engine.config, batch)
    benchmark.group = f"{PRESET} batch {batch}"
    benchmark.extra_info.update(backend=backend, precision=engine.precision, threads=THREADS)
    benchmark.pedantic(engine.predict, args=(x, tod, dow), warmup_rounds=3, rounds=20, iterations=1)


def test_eager_staged_forward(benchmark, engine_dir):
    from stvfm_engine import load_model

    model = load_model(engine_dir[1])
    x, tod, dow = (torch.from_numpy(a) for a in make_inputs(model.config, 1))

    def run():
        with torch.inference_mode():
            staged_forward(model, x, tod, dow)

    benchmark.group = f"{PRESET} batch 1"
    benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
