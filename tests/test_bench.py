"""The bench harness: structure of its results, never its speed (speed is measured in bench/)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from stvfm_engine.bench import roofline
from stvfm_engine.bench.report import RESULT_KEYS, format_table
from stvfm_engine.bench.runner import BenchError, Variant, make_inputs, parse_list, run_bench
from stvfm_engine.bench.stages import STAGES, eager_stages, staged_forward
from stvfm_engine.engine.timing import Schedule, summarize, time_interleaved
from stvfm_engine.model.config import from_preset
from stvfm_engine.model.stvfm import build_model

TINY = from_preset("tiny", backbone_layers=1)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(TINY, seed=0)


def _eager(model):
    def predict(x, tod, dow):
        with torch.inference_mode():
            return model(*(None if a is None else torch.from_numpy(a) for a in (x, tod, dow))).numpy()
    return predict


def test_schedule_and_interleaving_order():
    order = []
    sched = Schedule(warmup=1, rounds=3, block=4, drop=1, cooldown_s=0.25)
    out = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, sched,
                           sleep=lambda s: order.append(s))
    assert {k: len(v) for k, v in out.items()} == {"a": 9, "b": 9} == {k: sched.kept_per_variant for k in out}
    blocks = [order[i:i + 5] for i in range(2, len(order), 5)]  # after the warm-up calls
    assert all(b[0] == 0.25 for b in blocks) and len(blocks) == 6  # a cool-down pause before every block
    assert [b[1] for b in blocks] == ["a", "b", "b", "a", "a", "b"]  # blocks of 4, order rotates
    assert all(len(set(b[1:])) == 1 for b in blocks)
    assert Schedule.for_iters(20).kept_per_variant >= 20
    with pytest.raises(ValueError):
        Schedule(block=2, drop=2)
    with pytest.raises(ValueError):
        Schedule(cooldown_s=-1)


def test_summarize_percentiles_ordered():
    s = summarize(list(np.random.default_rng(0).exponential(5.0, 50)), batch=4)
    assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
    assert s["throughput"] == pytest.approx(4e3 / s["p50_ms"])


def test_staged_forward_is_the_model(tiny_model):
    x, tod, dow = (torch.from_numpy(a) for a in make_inputs(TINY, 3))
    with torch.inference_mode():
        torch.testing.assert_close(staged_forward(tiny_model, x, tod, dow), tiny_model(x, tod, dow), rtol=0, atol=0)


def test_eager_stages_cover_every_stage(tiny_model):
    x, tod, dow = (torch.from_numpy(a) for a in make_inputs(TINY, 2))
    rows = eager_stages(tiny_model, x, tod, dow, iters=2, warmup=1)
    assert [r["stage"] for r in rows] == list(STAGES)
    assert all(r["ms"] > 0 for r in rows if r["stage"] != "normalise+flow")
    assert sum(r["fraction"] for r in rows) == pytest.approx(1.0)


def test_roofline_flops_match_torch_flop_counter(tiny_model):
    from torch.utils.flop_counter import FlopCounterMode

    x, tod, dow = (torch.from_numpy(a) for a in make_inputs(TINY, 2))
    with FlopCounterMode(display=False) as counter:
        tiny_model(x, tod, dow)
    counts = counter.get_flop_counts()
    cost = roofline.model_cost(tiny_model.config, 2)
    shape = roofline.backbone_shape(tiny_model.config)
    # torch's counter sees no FLOPs in the CPU's fused SDPA: add the attention products back
    S = TINY.num_tokens + shape.prefix_tokens
    sdpa = 4 * 4 * S * S * shape.dim * shape.layers
    assert cost["flops"] == sum(counts["Global"].values()) + sdpa
    assert cost["stages"]["head"]["flops"] == sum(counts["STVFM.head"].values())
    weights = sum(p.numel() for n, p in tiny_model.named_parameters() if n != "backbone.pos_embed")
    assert cost["weight_bytes"] == 4 * weights
    assert roofline.model_cost(tiny_model.config, 2, "bf16")["bytes"] * 2 == cost["bytes"]


def test_roofline_peaks():
    cost = {"flops": 2e12, "bytes": 1e9}
    h100 = roofline.achieved(cost, 10.0, "NVIDIA H100 80GB HBM3", "bf16")
    assert h100["tflops"] == pytest.approx(200.0) and h100["fraction_of_peak_tflops"] == pytest.approx(200 / 989.4)
    assert roofline.achieved(cost, 10.0, "NVIDIA H200", "bf16")["peak_gb_s"] == 4800
    assert roofline.achieved(cost, 10.0, "AMD EPYC")["fraction_of_peak_tflops"] is None


def test_run_bench_report_structure(tiny_model, tmp_path):
    predict = _eager(tiny_model)
    variants = [Variant("eager", "fp32", predict), Variant("onnxruntime", "fp32", predict)]
    report = run_bench(variants, tiny_model.config, [1, 3], Schedule(warmup=1, rounds=2, block=3, drop=1),
                       threads=1, measure_memory=False, stage_model=tiny_model, stage_iters=2)
    for key in ("device", "versions", "git_sha", "date", "command", "config", "results", "stages"):
        assert key in report
    assert {(r["backend"], r["batch"]) for r in report["results"]} == {(b, n) for b in ("eager", "onnxruntime")
                                                                        for n in (1, 3)}
    for r in report["results"]:
        assert set(RESULT_KEYS) <= set(r)
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in report["results"] if r["backend"] == "eager")
    assert {(s["batch"], s["stage"]) for s in report["stages"]} == {(b, s) for b in (1, 3) for s in STAGES}
    json.dumps(report)  # plain data
    assert "onnxruntime" in format_table(report)
    pytest.importorskip("matplotlib")
    from stvfm_engine.bench.plot import plot_report

    out = plot_report(report, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_requests():
    with pytest.raises(BenchError):
        parse_list("1,x", int)
    with pytest.raises(BenchError):
        run_bench([], TINY, [1])


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from stvfm_engine.export.build import build_engine
    from stvfm_engine.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("bench")
    ckpt = save_checkpoint(build_model(TINY, seed=0), d / "tiny.pt")
    return build_engine(ckpt, d / "tiny.engine", backends=["onnxruntime"], progress=False), ckpt


def test_bench_cli_on_a_tiny_engine(tiny_engine, tmp_path):
    engine, _ = tiny_engine
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "stvfm_engine", "bench", str(engine), "--backends", "eager,onnxruntime",
           "--batch", "1,2", "--iters", "3", "--warmup", "1", "--threads", "1", "--stage-iters", "2",
           "--cooldown", "0.05", "--alone", "--json", str(out), "--quiet"]
    try:
        import matplotlib  # noqa: F401
        cmd += ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        pass
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {(r["backend"], r["batch"]) for r in report["results"]} == {(b, n) for b in ("eager", "onnxruntime")
                                                                        for n in (1, 2)}
    for r in report["results"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["peak_mem_mb"] > 0
        assert r["alone_p50_ms"] > 0 and r["vs_alone"] == pytest.approx(r["p50_ms"] / r["alone_p50_ms"])
    assert report["schedule"]["cooldown_s"] == 0.05
    check = report["alone_check"]  # its verdict depends on the machine's load: only its structure is tested
    assert check["rows"] == 4 and check["ok"] == (not check["outside"])
    assert len(report["stages"]) == 2 * len(STAGES)
    assert "p50 ms" in proc.stdout and "harness check" in proc.stdout


def test_bench_cli_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stvfm_engine", "bench", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "neither an engine directory nor a checkpoint" in proc.stderr
