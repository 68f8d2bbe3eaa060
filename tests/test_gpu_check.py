"""``python -m stvfm_engine.bench.gpu_check``: the CPU rehearsal (every phase, ``tiny``, Triton's interpreter),
a run stopped with SIGTERM halfway, and the refusal without CUDA.

The rehearsal runs once per module (a fixture shared by its assertions): it is the same pipeline a GPU
machine runs, so it cannot rot unseen. Each run is tagged with an environment variable that its child
processes inherit, so the tests can tell that nothing is left behind.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stvfm_engine.bench.gpu_check import PHASES
from stvfm_engine.bench.gpu_goals import GOALS

REPO = Path(__file__).resolve().parents[1]
TAG = "STVFM_GPU_CHECK_TEST_RUN"
KEYS = ["device", "date", "versions", "deadline_s", "phases", "parity", "runs", "errors", "verdicts"]
REHEARSAL_LIMIT_S = 180  # issue 22: under 3 minutes on the idle 2-core CI machine


def limit_s(load: float) -> float:
    """The time limit on a machine that ``load`` (1-minute load average at the start) keeps busy: other work
    on a shared machine slows the rehearsal about in proportion; an idle machine gets the issue's limit."""
    return REHEARSAL_LIMIT_S * max(1.0, load / (os.cpu_count() or 1))

def launch(out: Path, *args: str) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag}
    env.pop("TRITON_INTERPRET", None)  # the rehearsal must set it for itself and its children
    proc = subprocess.Popen([sys.executable, "-m", "stvfm_engine.bench.gpu_check", *args, "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, tag


def tagged_processes(tag: str) -> list[int]:
    """Live processes (zombies aside) whose environment carries this run's tag."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"{TAG}={tag}".encode() in (d / "environ").read_bytes().split(b"\0") and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(d.name))
        except OSError:
            continue
    return found


def no_process_left(tag: str, grace_s: float = 5.0) -> list[int]:
    until = time.monotonic() + grace_s
    while (left := tagged_processes(tag)) and time.monotonic() < until:
        time.sleep(0.2)
    return left


def result_file(out: Path) -> Path:
    files = list(out.glob("gpu-check-*.json"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal")
    load = os.getloadavg()[0]
    started = time.monotonic()
    proc, tag = launch(out, "--rehearse")
    stdout, stderr = proc.communicate(timeout=600)
    seconds = time.monotonic() - started
    path = result_file(out)
    return SimpleNamespace(rc=proc.returncode, seconds=seconds, load=load, path=path,
                           result=json.loads(path.read_text()), stdout=stdout, stderr=stderr, left=no_process_left(tag))


def test_rehearsal_finishes_in_time_without_errors(rehearsal):
    assert rehearsal.rc == 0, rehearsal.stderr[-3000:]
    assert rehearsal.seconds < limit_s(rehearsal.load), f"{rehearsal.seconds:.0f} s (load {rehearsal.load:.1f})"
    r = rehearsal.result
    assert list(r) == KEYS
    assert r["errors"] == []
    assert re.fullmatch(r"gpu-check-[a-z0-9-]+-\d{8}T\d{4}Z\.json", rehearsal.path.name)
    assert rehearsal.left == []
    assert str(rehearsal.path) in rehearsal.stdout
    logs = rehearsal.path.with_suffix(".logs")  # every child's output, kept beside the JSON
    assert {"prepare-tiny.log", "parity-triton-bf16.log", "time-tiny.log", "gpu-tests.log"} <= \
        {f.name for f in logs.iterdir()}


def test_rehearsal_runs_every_phase(rehearsal):
    phases = rehearsal.result["phases"]
    assert list(phases) == list(PHASES)
    for name, entry in phases.items():
        assert entry["seconds"] >= 0 and (name == "environment" or entry["seconds"] > 0), (name, entry)
        expected = "skipped: " if name == "gpu_tests" else "ok"
        assert entry["status"].startswith(expected), (name, entry["status"])
    assert phases["environment"]["rehearsal"] is True and phases["environment"]["interpreter"] == "TRITON_INTERPRET=1"
    tests = phases["gpu_tests"]  # on a CPU every gpu test skips: counted as skipped, never as passed
    assert tests["passed"] == 0 and tests["failed"] == 0 and tests["skipped"] > 0
    assert "CUDA" in tests["status"]
    skipped = phases["parity"]["skipped"]
    assert set(skipped) >= {"compile/bf16", "aoti/bf16", "tensorrt/fp16"}


def test_rehearsal_parity_and_timings(rehearsal):
    r = rehearsal.result
    parity = r["parity"]
    assert {"eager/bf16", "triton/bf16"} <= set(parity)
    assert not {"compile/bf16", "aoti/bf16"} & set(parity)  # not run: absent, not zero
    assert all(0 < err <= 5e-2 for err in parity.values()), parity
    assert any(k.endswith(":triton/bf16") for k in parity)  # the large phase's own parity
    run = r["runs"]["tiny"]
    rows = {(x["backend"], x["batch"]): x for x in run["results"]}
    assert set(rows) == {("eager", 1), ("triton", 1), ("eager", 2), ("triton", 2)}
    assert all(x["samples"] == 2 and x["p50_ms"] > 0 for x in rows.values())
    assert run["schedule"]["cooldown_s"] == 0 and run["schedule"]["timer"] == "perf_counter"
    assert {s["runner"] for s in run["stages"]} == {"eager", "triton"}
    ratios = r["phases"]["fused_ops"]["ratios"]
    assert set(ratios) == {"flow_patchify", "token_adapter", "prompt_condition + bilateral_attention"}
    assert all(v > 0 for op in ratios.values() for v in op.values())


def test_rehearsal_verdicts_say_not_measured(rehearsal):
    verdicts = rehearsal.result["verdicts"]
    assert list(verdicts) == [g.name for g in GOALS] and len(verdicts) == 7
    for v in verdicts.values():
        assert list(v) == ["status", "figure", "target"]
        assert v["status"] == "not measured (no CUDA)" and v["figure"] is None and v["target"]


def test_sigterm_halfway_leaves_the_phases_done(tmp_path):
    proc, tag = launch(tmp_path, "--rehearse")
    until = time.monotonic() + 300
    try:
        while time.monotonic() < until and proc.poll() is None:  # parity done, batch 1 being timed
            files = list(tmp_path.glob("gpu-check-*.json"))
            if files:
                try:
                    if json.loads(files[0].read_text())["phases"]["batch1"]["status"] == "running":
                        break
                except (OSError, ValueError):
                    pass
            time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be stopped halfway"
        time.sleep(2)  # the timing process is starting or running
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert time.monotonic() - stopped < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    r = json.loads(result_file(tmp_path).read_text())
    assert list(r) == KEYS
    phases = r["phases"]
    assert phases["environment"]["status"] == phases["parity"]["status"] == "ok"
    assert phases["batch1"]["status"] == "interrupted"
    assert all(phases[p]["status"] == "not run (stopped by SIGTERM)" for p in PHASES[3:])
    assert {"eager/bf16", "triton/bf16"} <= set(r["parity"])
    assert r["errors"] == [{"phase": "batch1", "variant": None, "message": "stopped by SIGTERM"}]
    assert no_process_left(tag) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run in full")
def test_refuses_without_cuda_at_once(tmp_path):
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "stvfm_engine.bench.gpu_check", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert time.monotonic() - started < 30  # the time of importing torch, nothing else
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stdout.startswith("no CUDA device: ") and out.stdout.count("\n") == 1, out.stdout
    assert list(tmp_path.iterdir()) == []


def gpu_like_result(errors=()) -> dict:
    """A result as a GPU run leaves it (figures made up for the verdict logic, not measured)."""
    rows = [{"backend": b, "batch": 1, "p50_ms": ms} for b, ms in (("triton", 0.45), ("compile", 0.47),
                                                                   ("eager", 0.9))]
    ops = {"ratios": {"flow_patchify": {"1": 3.0, "64": 2.5}, "token_adapter": {"1": 2.2, "64": 1.9},
                      "prompt_condition + bilateral_attention": {"1": 4.0}},
           "backbone": {"1": {"fraction_of_peak": 0.05}, "64": {"fraction_of_peak": 0.41}}}
    return {"runs": {"city": {"results": rows}}, "phases": {"fused_ops": ops}, "errors": list(errors)}


def test_verdicts_on_gpu_figures():
    from stvfm_engine.bench.gpu_goals import verdicts

    v = verdicts(gpu_like_result(), "city", cuda=True)
    assert {k: x["status"] for k, x in v.items()} == {
        "city_b1_triton_bf16_ms": "met", "city_b1_vs_compile_max_autotune": "not met",
        "city_b1_vs_eager_bf16": "met", "fused_flow_patchify": "met", "fused_token_adapter": "not met",
        "fused_bilateral_prompt_attention": "met", "backbone_b64_fraction_of_bf16_peak": "met"}
    assert v["city_b1_vs_compile_max_autotune"]["figure"] == pytest.approx(0.47 / 0.45, abs=1e-4)
    assert v["fused_token_adapter"]["figure"] == 1.9  # the smaller ratio of the batches measured
    missing = gpu_like_result()
    missing["runs"]["city"]["results"].pop(1)
    missing["phases"]["fused_ops"] = {}
    v = verdicts(missing, "city", cuda=True)
    assert v["city_b1_vs_compile_max_autotune"]["status"] == "not measured (compile not timed at batch 1)"
    assert v["fused_flow_patchify"]["status"].startswith("not measured (")
    assert v["fused_flow_patchify"]["figure"] is None
    bad = gpu_like_result([{"phase": "parity", "variant": "triton/bf16", "message": "max relative error 0.3 above "
                                                                                    "the 0.02 tolerance"}])
    bad["runs"]["city"]["results"].pop(0)  # a variant that fails parity is not timed
    v = verdicts(bad, "city", cuda=True)
    assert v["city_b1_triton_bf16_ms"]["status"] == v["city_b1_vs_eager_bf16"]["status"] == \
        "not measured (triton failed parity)"


def test_junit_counts_skips_are_not_passes(tmp_path):
    from stvfm_engine.bench.gpu_check import junit_counts

    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
                   '<testcase name="a"><skipped message="needs a CUDA device"/></testcase>'
                   '<testcase name="b"><skipped message="needs a CUDA device"/></testcase>'
                   '<testcase name="c"><failure message="x"/></testcase><testcase name="d"/></testsuite></testsuites>')
    assert junit_counts(xml) == {"passed": 1, "failed": 1, "errors": 0, "skipped": 2,
                                 "skip_reason": "needs a CUDA device"}
    assert junit_counts(tmp_path / "absent.xml")["errors"] == 1
