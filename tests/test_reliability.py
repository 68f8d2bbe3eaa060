"""Reliability: atomic builds under SIGKILL, threads, memory over thousands of calls, artifact
versions, and the cost of input validation.

One tiny engine (onnxruntime + aoti, max batch 8) is built per module; the SIGKILL tests run the real
``stvfm-engine build`` in a subprocess (onnxruntime only) and kill it at several moments, triggered by
what the build has written so far, from "still importing" to "manifest written, swap next".
(tests/test_build.py covers a build that fails with an exception and a rebuild; tests/test_engine.py
covers threads with allclose for onnxruntime/aoti. Here: kills, bit-identity incl. eager, memory.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stvfm_engine.cli import main
from stvfm_engine.engine import Engine, reference_model
from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine import BackendError, get_backend
from stvfm_engine.export.atomic_dir import clean_stale
from stvfm_engine.export.build import build_engine
from stvfm_engine.engine.manifest import read_manifest, sha256_file, verify_files
from stvfm_engine.export.parity import ParityError, relative_error
from stvfm_engine.model.checkpoint import save_checkpoint
from stvfm_engine.model.stvfm import build_model
from helpers import CONFIGS

CONFIG = CONFIGS["deit-tiny-distilled-c2-7x6-p2-T4-H2-day24"]
MAX_BATCH = 8
X_SHAPE = [CONFIG.history, CONFIG.channels, CONFIG.height, CONFIG.width]


def inputs(batch: int, rng: np.random.Generator):
    x = (8.0 + 3.0 * rng.standard_normal((batch, *X_SHAPE))).astype(np.float32)
    return x, rng.integers(0, CONFIG.steps_per_day, (batch, CONFIG.history)), rng.integers(0, 7, (batch, CONFIG.history))


def reference(model, x, tod, dow) -> np.ndarray:
    with torch.inference_mode():
        return model(*(torch.as_tensor(a) for a in (x, tod, dow))).numpy()


def write_checkpoint(path: Path, seed: int) -> Path:
    model = build_model(CONFIG, seed=seed)
    model.set_normalization([8.0, 9.0], [3.0, 2.5])
    return save_checkpoint(model, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    ckpt = write_checkpoint(root / "a.pt", seed=21)
    other = write_checkpoint(root / "b.pt", seed=22)  # what the killed builds would have produced
    engine = build_engine(ckpt, root / "a.engine", backends=["onnxruntime", "aoti"], max_batch=MAX_BATCH,
                          progress=False)
    return {"ckpt": ckpt, "other": other, "engine": engine, "ref": reference_model(engine)}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stvfm-engine {command}: error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- atomic builds under SIGKILL
def _siblings(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*"))


def _build_dir(target: Path, pid: int) -> Path | None:
    """The temp sibling of the build process ``pid`` (not a stale one of an earlier, killed build)."""
    found = [p for p in target.parent.glob(f".{target.name}.build-{pid}-*") if p.is_dir()]
    return found[0] if found else None


def _has(name: str):
    def trigger(target: Path, pid: int) -> bool:
        d = _build_dir(target, pid)
        try:
            return d is not None and any(p.name == name or p.name.startswith(f".{name}.") for p in d.iterdir())
        except FileNotFoundError:  # swapped into place meanwhile
            return True
    return trigger


TRIGGERS = {  # the first may lose the race to the swap; every later one kills mid-build and strands a sibling
    "manifest written, swap next": _has("manifest.json"),
    "while importing (1.5 s)": None,
    "temp sibling appears": lambda target, pid: _build_dir(target, pid) is not None,
    "weights written": _has("weights.safetensors"),
    "onnx exported, parity running": _has("model.onnx"),
}


def _start_build(ckpt: Path, target: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stvfm_engine", "build", str(ckpt), "-o", str(target),
                             "--backends", "onnxruntime", "--max-batch", "3", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, target: Path, trigger, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` once ``trigger(target)`` holds; False if the build ended first."""
    start = time.monotonic()
    if trigger is None:
        time.sleep(1.5)
    else:
        while not trigger(target, proc.pid):
            if proc.poll() is not None:
                return False
            assert time.monotonic() - start < timeout, "build never reached the trigger"
            time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def _assert_old_or_complete_new(target: Path, before: dict[str, bytes] | None, built: dict) -> str:
    """DIR is exactly the old one, absent (if there was none), or a complete new build: never a mix."""
    if not target.exists():
        if before is None:
            return "none"
        # killed in the instant between the two renames: the old DIR waits, whole, beside
        # (test_sigkill_between_the_two_renames_is_repaired forces this moment); put it back
        stranded = [p for p in _siblings(target) if ".old-" in p.name]
        assert len(stranded) == 1 and snapshot(stranded[0]) == before, "the old DIR disappeared"
        clean_stale(target)
        assert snapshot(target) == before
        return "old"
    if before is not None and snapshot(target) == before:
        state = "old"
        ckpt, ref = built["ckpt"], built["ref"]
    else:
        m = read_manifest(target)
        verify_files(target, m)  # every file the new manifest lists is there and whole
        assert set(m["files"]) == set(snapshot(target)) - {"manifest.json"}, "extra or missing files: a mix"
        assert m["checkpoint"]["sha256"] == sha256_file(built["other"]) and set(m["backends"]) == {"onnxruntime"}
        state = "new"
        ckpt, ref = built["other"], reference_model(target)
    engine = Engine.load(target, backend="onnxruntime")
    x, tod, dow = inputs(2, np.random.default_rng(len(state)))
    assert relative_error(engine.predict(x, tod, dow), reference(ref, x, tod, dow)) <= 1e-4, ckpt
    return state


def test_sigkill_during_build_leaves_old_dir_intact(built, tmp_path):
    target = tmp_path / "eng"
    shutil.copytree(built["engine"], target)
    before = snapshot(target)
    outcomes, stranded = {}, set()
    for moment, trigger in TRIGGERS.items():
        proc = _start_build(built["other"], target)
        killed = _kill_when(proc, target, trigger)
        state = _assert_old_or_complete_new(target, before, built)
        outcomes[moment] = (killed, state)
        leftover = {p.name for p in _siblings(target)}
        if any(n.startswith(f".eng.build-{proc.pid}-") for n in leftover):
            # it got as far as its own temp sibling, and a build cleans stale ones before making its own
            # (one killed while still importing never got there, and may leave them)
            assert not (stranded & leftover), "a build did not clean the siblings of earlier killed builds"
        stranded = leftover
        if state == "new":  # the build won the race: start the next moment from the old DIR again
            shutil.rmtree(target)
            shutil.copytree(built["engine"], target)
            before = snapshot(target)
    print("SIGKILL outcomes (killed, DIR state):", outcomes)
    (first_killed, first_state), *mid_build = outcomes.values()
    assert first_state in ("old", "new") and (first_killed or first_state == "new"), outcomes
    assert all(o == (True, "old") for o in mid_build), outcomes  # killed mid-build: the old DIR, bit-identical
    assert [p.name.startswith(".eng.build-") for p in _siblings(target)] == [True], "the last kill strands its sibling"
    # the next build cleans every stale sibling, even when it fails itself
    with pytest.raises(ParityError):
        _failing_build(built["ckpt"], target)
    assert _siblings(target) == [] and snapshot(target) == before
    build_engine(built["other"], target, backends=["onnxruntime"], max_batch=3, progress=False)
    assert _siblings(target) == [] and _assert_old_or_complete_new(target, before, built) == "new"


def _failing_build(ckpt, target):
    import stvfm_engine.export.build as b

    real = b.check_parity

    def broken(*args, **kwargs):
        raise ParityError("injected parity failure")

    b.check_parity = broken
    try:
        build_engine(ckpt, target, backends=["onnxruntime"], max_batch=3, progress=False)
    finally:
        b.check_parity = real


def test_sigkill_of_a_first_build_leaves_no_dir(built, tmp_path):
    target = tmp_path / "fresh"
    proc = _start_build(built["other"], target)
    assert _kill_when(proc, target, TRIGGERS["onnx exported, parity running"])
    assert not target.exists() and _siblings(target)
    assert _assert_old_or_complete_new(target, None, built) == "none"
    clean_stale(target)
    assert _siblings(target) == [] and not target.exists()


KILL_BETWEEN_RENAMES = """
import os, signal, sys
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    if ".old-" in os.fspath(dst):  # the old DIR is moved aside; die before the new one moves in
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
from stvfm_engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_between_the_two_renames_is_repaired(built, tmp_path):
    """The one moment where DIR is briefly absent: the next build (even a failing one) puts the old
    DIR back before it starts."""
    target = tmp_path / "eng"
    shutil.copytree(built["engine"], target)
    before = snapshot(target)
    r = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, "build", str(built["other"]), "-o", str(target),
                        "--backends", "onnxruntime", "--max-batch", "3", "-q"], capture_output=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not target.exists()
    stranded = [p for p in _siblings(target) if ".eng.old-" in p.name]
    assert len(stranded) == 1 and snapshot(stranded[0]) == before  # the old DIR, whole, beside
    with pytest.raises(ParityError):
        _failing_build(built["ckpt"], target)
    assert snapshot(target) == before and _siblings(target) == []
    assert _assert_old_or_complete_new(target, before, built) == "old"


# ----------------------------------------------------------------------------- threads and memory
@pytest.mark.parametrize("backend", ["onnxruntime", "aoti", "eager"])
def test_eight_threads_give_bit_identical_results(built, backend):
    engine = Engine.load(built["engine"], backend=backend)
    rng = np.random.default_rng({"onnxruntime": 1, "aoti": 2, "eager": 3}[backend])
    jobs = [inputs(b, rng) for b in (1, 8, 3, 5, 2, 7, 4, 6) * 3]  # 24 calls, mixed batch sizes
    expected = [engine.predict(*job) for job in jobs]
    for job, want in zip(jobs[:8], expected[:8]):
        assert relative_error(want, reference(built["ref"], *job)) <= 1e-4
    for round_ in range(2):
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def worker(t: int) -> None:
            try:
                barrier.wait()
                order = range(t, len(jobs), 8) if (t + round_) % 2 else reversed(range(t, len(jobs), 8))
                for i in order:
                    results[i] = engine.predict(*jobs[i])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and len(results) == len(jobs), errors
        for i, want in enumerate(expected):
            assert results[i].shape == want.shape and np.array_equal(results[i], want), (backend, round_, i)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_memory_does_not_grow_over_thousands_of_calls(built, backend):
    """2000 calls at batch 4..8 move about 20 MB of inputs and outputs: a per-call leak of either would
    show as ~20 MB of growth; we allow 6 MB of allocator noise. One thread: the machine is shared."""
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.load(built["engine"], backend=backend, threads=1)
        rng = np.random.default_rng(3)
        jobs = [inputs(b, rng) for b in (4, 5, 6, 7, 8)]
        for i in range(250):
            engine.predict(*jobs[i % len(jobs)])
        start = rss_mb()
        t0 = time.perf_counter()
        for i in range(2000):
            y = engine.predict(*jobs[i % len(jobs)])
        seconds = time.perf_counter() - t0
        growth = rss_mb() - start
    finally:
        torch.set_num_threads(before_threads)
    print(f"{backend}: RSS growth over 2000 calls {growth:.2f} MB ({seconds:.1f} s)")
    assert y.shape == (8, CONFIG.horizon, *X_SHAPE[1:])
    assert growth < 6.0, f"{backend} grew {growth:.1f} MB over 2000 calls"


# ----------------------------------------------------------------------------- validation cost
def test_validation_costs_little_next_to_inference(built):
    engine = Engine.load(built["engine"], backend="eager")
    rng = np.random.default_rng(4)
    report = {}
    for batch in (1, MAX_BATCH):
        x, tod, dow = inputs(batch, rng)
        check, infer = [], []
        for _ in range(6):  # interleaved blocks; the first call of each block is dropped
            for i in range(21):
                t = time.perf_counter()
                validate_inputs(engine.config, engine.max_batch, x, tod, dow)
                if i:
                    check.append(time.perf_counter() - t)
            for i in range(6):
                t = time.perf_counter()
                engine.predict(x, tod, dow)
                if i:
                    infer.append(time.perf_counter() - t)
        report[batch] = (statistics.median(check), statistics.median(infer))
    for batch, (v, p) in report.items():
        print(f"batch {batch}: validation {v * 1e6:.0f} us, eager predict {p * 1e3:.2f} ms ({100 * v / p:.1f}%)")
        assert v < 0.1 * p, report


# ----------------------------------------------------------------------------- artifact versions
def _edit_manifest(directory: Path, change) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    change(m)
    (directory / "manifest.json").write_text(json.dumps(m))


def test_aoti_needs_the_torch_major_minor_it_was_built_with(built, tmp_path, capsys):
    d = tmp_path / "eng"
    shutil.copytree(built["engine"], d)
    here = torch.__version__
    major, minor = (int(v) for v in here.split(".")[:2])
    x, tod, dow = inputs(3, np.random.default_rng(6))
    want = reference(built["ref"], x, tod, dow)
    np.savez(tmp_path / "in.npz", x=x, tod=tod, dow=dow)
    for recorded in (f"{major}.{minor + 1}.0", f"{major}.{minor - 1}.3+cu126", f"{major + 1}.{minor}.0", None, "nightly"):
        _edit_manifest(d, lambda m: m["versions"].update(torch=recorded))
        with pytest.raises(BackendError) as info:
            Engine.load(d, backend="aoti")
        msg = str(info.value)
        assert f"model.pt2 was built with torch {recorded}, this is torch {here}" in msg and "\n" not in msg
        assert f"stvfm-engine build CKPT -o {d}" in msg
        assert main(["run", str(d), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"),
                     "--backend", "aoti"]) == 2
        assert "stvfm-engine build" in one_error_line(capsys.readouterr().err, "run")
        assert not (tmp_path / "out.npz").exists()
        for backend in (None, "onnxruntime", "eager"):  # what needs no particular torch still serves
            assert relative_error(Engine.load(d, backend=backend).predict(x, tod, dow), want) <= 1e-4
    _edit_manifest(d, lambda m: m["versions"].update(torch=f"{major}.{minor}.99+cpu"))  # same major.minor
    assert relative_error(Engine.load(d, backend="aoti").predict(x, tod, dow), want) <= 1e-4


def test_tensorrt_plan_needs_the_exact_version(built, tmp_path, monkeypatch):
    """Checked from the manifest before TensorRT opens the plan (TensorRT is not installed here: the
    installed version is simulated)."""
    manifest = {"versions": {"tensorrt": "10.3.0"}}
    monkeypatch.setattr("stvfm_engine.engine.backends.tensorrt.installed_version", lambda dist: "10.9.0")
    assert get_backend("tensorrt").version_problem(manifest) == (
        "model.plan was built with TensorRT 10.3.0, this is TensorRT 10.9.0 (a plan needs the exact version)")
    assert get_backend("tensorrt").version_problem({"versions": {"tensorrt": "10.9.0"}}) is None
    for backend in ("onnxruntime", "eager", "triton"):
        assert get_backend(backend).version_problem({"versions": {"torch": "0.1", "onnxruntime": "0.1"}}) is None
    d = tmp_path / "eng"
    shutil.copytree(built["engine"], d)
    (d / "model.plan").write_bytes(b"a serialized plan")

    def add_plan(m):
        m["versions"]["tensorrt"] = "10.3.0"
        m["files"]["model.plan"] = {"sha256": sha256_file(d / "model.plan"), "bytes": 17}
        m["backends"]["tensorrt"] = {"file": "model.plan", "precision": "fp16", "device": "cuda", "parity": {},
                                     "build_seconds": 1.0}

    _edit_manifest(d, add_plan)
    with pytest.raises(BackendError, match=r"built with TensorRT 10.3.0, this is TensorRT 10.9.0.*"
                                           r"rebuild it on this machine: stvfm-engine build CKPT -o"):
        Engine.load(d, backend="tensorrt")


def test_onnx_with_an_opset_onnxruntime_lacks_is_refused_naming_the_rebuild(built, tmp_path):
    import onnx

    d = tmp_path / "eng"
    shutil.copytree(built["engine"], d)
    proto = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 40
    onnx.save(proto, str(d / "model.onnx"))
    _edit_manifest(d, lambda m: m["files"]["model.onnx"].update(sha256=sha256_file(d / "model.onnx")))
    with pytest.raises(BackendError) as info:
        Engine.load(d, backend="onnxruntime")
    msg = str(info.value)
    assert "cannot open" in msg and f"stvfm-engine build CKPT -o {d}" in msg and "\n" not in msg, msg
    x, tod, dow = inputs(2, np.random.default_rng(8))
    assert relative_error(Engine.load(d, backend="eager").predict(x, tod, dow),
                          reference(built["ref"], x, tod, dow)) <= 1e-4
