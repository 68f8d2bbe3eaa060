"""The harness check, on this machine: every backend timed interleaved with the others must agree with
itself timed alone in a fresh process (same schedule) within 15%. It depends on the machine being
otherwise idle, so it lives here and not in tests/: ``pytest bench/suite/test_harness.py``
(``STVFM_BENCH_PRESET`` / ``STVFM_BENCH_THREADS`` as for the latency suite).
"""
from __future__ import annotations

import os

import pytest

from stvfm_engine.bench.runner import ALONE_TOLERANCE, engine_variants, run_bench
from stvfm_engine.engine.timing import Schedule
from stvfm_engine.model.checkpoint import save_checkpoint
from stvfm_engine.model.config import from_preset
from stvfm_engine.model.stvfm import build_model

PRESET = os.environ.get("STVFM_BENCH_PRESET", "tiny")
THREADS = int(os.environ.get("STVFM_BENCH_THREADS", "2"))


def test_interleaved_agrees_with_alone(tmp_path):
    pytest.importorskip("onnxruntime")
    from stvfm_engine.export.build import build_engine

    config = from_preset(PRESET)
    ckpt = save_checkpoint(build_model(config, seed=0), tmp_path / f"{PRESET}.pt")
    engine = build_engine(ckpt, tmp_path / "fp32.engine", backends=["onnxruntime"], progress=False)
    variants = engine_variants(engine, ["eager", "onnxruntime"], None, THREADS)
    report = run_bench(variants, config, [1], Schedule(warmup=5, rounds=6, block=10, drop=3), THREADS,
                       measure_memory=False, alone=True)
    ratios = {r["backend"]: round(r["vs_alone"], 3) for r in report["results"]}
    assert report["alone_check"]["ok"], (f"interleaved/alone p50 outside 1 +- {ALONE_TOLERANCE}: {ratios} "
                                         f"(load average {report['device']['load_avg_1_5_15']})")
