"""Security: checkpoints, inputs and engine files from elsewhere, tried as an attacker would.

Trust model: a checkpoint and every input are untrusted data (nothing in them may run); an engine
directory is trusted code, and the sha256 values in its manifest catch corruption and mix-ups.

* Every command that reads a checkpoint (``eval``, ``train --init``, ``train --backbone-weights``,
  ``build``, ``bench CKPT``) and the library calls (``load_model``, ``read_checkpoint``,
  ``build_engine``) refuse a pickle that carries code with a one-line error, exit code 2, and the
  code never runs: its payload would create a marker file, which must never appear. Truncated,
  random-bytes, empty and missing files likewise. ``run`` refuses an ``.npz`` with a pickled array.
* A malformed or malicious ``manifest.json`` (wrong types, paths outside DIR, unknown format) and
  tampered, swapped, truncated or missing files are refused, whatever backend is asked for.
* CLI errors: one stderr line naming what was expected and what was found, exit 2, no traceback;
  ``--debug`` shows it; a failed command leaves no partial or changed output.

(tests/test_checkpoint_and_cli.py covers load_model + ``eval`` with one payload, bad checkpoint
dicts and init/train option errors; tests/test_engine.py covers predict-time input validation and a
tampered model.pt2 / weights file. This file covers the rest.)
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stvfm_engine.cli import main
from stvfm_engine.engine import Engine
from stvfm_engine.errors import CheckpointError, EngineDirError, ParityError, STVFMError
from stvfm_engine.export.build import build_engine
from stvfm_engine.engine.manifest import sha256_file
from stvfm_engine.engine.registry import names
from stvfm_engine.export.parity import relative_error
from stvfm_engine.model.checkpoint import checkpoint_dict, load_model, read_checkpoint, save_checkpoint
from stvfm_engine.model.stvfm import build_model
from helpers import CONFIGS, setter

CONFIG = CONFIGS["vit-tiny-c2-6x5-p2-T4-H2-day48"]
MAX_BATCH = 4
X_SHAPE = [CONFIG.history, CONFIG.channels, CONFIG.height, CONFIG.width]


# ----------------------------------------------------------------------------- hostile payloads
class RunsShell:
    """Unpickling this runs ``touch MARKER`` (via ``os.system``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """Unpickling this runs Python code that creates MARKER (via ``builtins.exec``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stvfm_engine", *args], capture_output=True, text=True, timeout=300)


def inputs(batch: int, rng: np.random.Generator):
    x = (10.0 + 4.0 * rng.standard_normal((batch, *X_SHAPE))).astype(np.float32)
    return x, rng.integers(0, CONFIG.steps_per_day, (batch, CONFIG.history)), rng.integers(0, 7, (batch, CONFIG.history))


def write_flow_data(prefix: Path, rng: np.random.Generator, grid=(CONFIG.height, CONFIG.width)) -> str:
    for split, steps in (("train", 120), ("val", 30), ("test", 30)):
        flow = rng.poisson(6.0, (steps, *grid, CONFIG.channels)).astype(np.float32)
        np.savez(f"{prefix}_{split}.npz", flow=flow)
    return str(prefix)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A good checkpoint and its ONNX Runtime engine, flow data, and a folder of hostile files."""
    root = tmp_path_factory.mktemp("security")
    rng = np.random.default_rng(2024)
    model = build_model(CONFIG, seed=3)
    model.set_normalization([10.0, 12.0], [4.0, 3.0])
    good = save_checkpoint(model, root / "good.pt")
    engine = build_engine(good, root / "good.engine", backends=["onnxruntime"], max_batch=MAX_BATCH, progress=False)
    data = write_flow_data(root / "flow", rng)
    marker = root / "PWNED"

    hostile = root / "hostile"
    hostile.mkdir()
    d = checkpoint_dict(model)
    d["metrics"] = {"note": RunsShell(marker)}  # a real checkpoint with code tucked inside
    torch.save(d, hostile / "ckpt_with_payload.pt", pickle_protocol=2)
    d["metrics"] = {"note": RunsPython(marker)}
    torch.save(d, hostile / "ckpt_with_exec.pt")
    torch.save(RunsShell(marker), hostile / "payload_only.pt")
    torch.save({"state_dict": {"w": RunsShell(marker)}}, hostile / "legacy_format.pt",
               _use_new_zipfile_serialization=False)
    (hostile / "raw_pickle.pt").write_bytes(pickle.dumps(RunsShell(marker), protocol=4))
    full = good.read_bytes()
    (hostile / "truncated.pt").write_bytes(full[: len(full) // 2])
    (hostile / "random.pt").write_bytes(rng.bytes(8192))
    (hostile / "empty.pt").write_bytes(b"")
    (hostile / "a_directory.pt").mkdir()
    return {"root": root, "good": good, "engine": engine, "data": data, "marker": marker, "hostile": hostile,
            "model": model}


HOSTILE = ["ckpt_with_payload.pt", "ckpt_with_exec.pt", "payload_only.pt", "legacy_format.pt", "raw_pickle.pt",
           "truncated.pt", "random.pt", "empty.pt", "a_directory.pt", "missing.pt"]


@pytest.fixture(autouse=True)
def _marker_never_appears(request):
    yield
    if "world" in request.fixturenames:
        marker = request.getfixturevalue("world")["marker"]
        assert not marker.exists(), "a hostile file ran code"


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"stvfm-engine {command}: error: ") and "Traceback" not in err, err
    return lines[0]


def payload_really_runs(world) -> None:
    """The payloads are live: an unsafe load would run them (proves the tests below can fail)."""
    marker = world["marker"]
    torch.load(world["hostile"] / "ckpt_with_payload.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    pickle.loads((world["hostile"] / "raw_pickle.pt").read_bytes())
    assert marker.exists()
    marker.unlink()


def test_payloads_are_live_when_loaded_unsafely(world):
    payload_really_runs(world)


# ----------------------------------------------------------------------------- checkpoints are data
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_checkpoint_refused_by_the_library(world, name, tmp_path):
    path = world["hostile"] / name
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert "\n" not in str(info.value) and name in str(info.value)
    with pytest.raises(CheckpointError):
        build_engine(path, tmp_path / "out.engine", backends=["onnxruntime"], progress=False)
    assert not (tmp_path / "out.engine").exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_checkpoint_refused_by_every_command(world, name, tmp_path, capsys):
    path = str(world["hostile"] / name)
    out = tmp_path / "out"
    commands = {
        "eval": ["eval", path, "--data", world["data"]],
        "train --init": ["train", "--init", path, "--data", world["data"], "--max-steps", "1", "--quiet",
                         "-o", str(out / "t.pt")],
        "build": ["build", path, "-o", str(out / "e.engine"), "--backends", "onnxruntime", "-q"],
        "bench": ["bench", path, "--backends", "onnxruntime", "--batch", "1", "--iters", "1", "--quiet"],
    }
    for label, argv in commands.items():
        assert main(argv) == 2, label
        line = one_error_line(capsys.readouterr().err, argv[0])
        assert name in line, (label, line)
    assert not out.exists()


@pytest.mark.parametrize("name", HOSTILE + ["random.safetensors"])
def test_hostile_backbone_weights_refused(world, name, tmp_path, capsys):
    path = world["hostile"] / name
    if name.endswith(".safetensors"):
        path = tmp_path / name
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + np.random.default_rng(1).bytes(64))
    out = tmp_path / "t.pt"
    argv = ["train", "--init", str(world["good"]), "--backbone-weights", str(path), "--data", world["data"],
            "--max-steps", "1", "--quiet", "-o", str(out)]
    with warnings.catch_warnings(record=True) as caught:  # a warning would be a second stderr line
        warnings.simplefilter("always")
        assert main(argv) == 2
    assert not caught, [str(w.message) for w in caught]
    line = one_error_line(capsys.readouterr().err, "train")
    assert path.name in line and ("backbone weights" in line or "not readable" in line), line
    assert not out.exists()


def test_real_cli_processes_exit_2_with_one_line_and_debug_shows_traceback(world, tmp_path):
    evil = str(world["hostile"] / "ckpt_with_payload.pt")
    for argv in (["build", evil, "-o", str(tmp_path / "e.engine"), "--backends", "onnxruntime"],
                 ["bench", evil, "--backends", "onnxruntime", "--batch", "1"]):
        r = run_cli(*argv)
        assert r.returncode == 2, r.stderr
        line = one_error_line(r.stderr, argv[0])
        assert "refused to load" in line and "weights_only" in line, line
        assert r.stdout == ""
    r = run_cli("--debug", "build", evil, "-o", str(tmp_path / "e.engine"))
    assert r.returncode not in (0, 2) and "Traceback" in r.stderr and "CheckpointError" in r.stderr
    assert not (tmp_path / "e.engine").exists() and not world["marker"].exists()


def test_hostile_npz_input_to_run(world, tmp_path, capsys):
    evil = np.empty(1, dtype=object)
    evil[0] = RunsShell(world["marker"])
    np.savez(tmp_path / "evil.npz", x=evil)  # np.savez pickles object arrays
    (tmp_path / "garbage.npz").write_bytes(np.random.default_rng(3).bytes(2048))
    for name, needle in (("evil.npz", "not a readable .npz of plain arrays"),
                         ("garbage.npz", "not a readable .npz"), ("absent.npz", "not found")):
        out = tmp_path / "out.npz"
        assert main(["run", str(world["engine"]), "--input", str(tmp_path / name), "--output", str(out)]) == 2
        assert needle in one_error_line(capsys.readouterr().err, "run")
        assert not out.exists()


# ----------------------------------------------------------------------------- engine directories
def copy_engine(world, tmp_path: Path) -> Path:
    out = tmp_path / "copy.engine"
    shutil.copytree(world["engine"], out)
    return out


def rewrite_manifest(directory: Path, change) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    result = change(m)
    text = result if isinstance(result, bytes) else (result if isinstance(result, str) else json.dumps(m)).encode()
    (directory / "manifest.json").write_bytes(text)


MALFORMED = {
    "not json": (lambda m: "{'format_version': 1", "unreadable manifest"),
    "a list": (lambda m: "[1, 2, 3]", "expected a manifest (a JSON object / dict), found list"),
    "binary": (lambda m: b"\xff\xfe\x00garbage", "unreadable manifest"),
    "format 3": (setter(["format_version"], 3), "unknown manifest format_version 3; this stvfm-engine reads 1 or 2"),
    "format '1'": (setter(["format_version"], "1"), "unknown manifest format_version '1'"),
    "no format": (lambda m: m.pop("format_version") and None, "unknown manifest format_version None"),
    "no files": (lambda m: m.pop("files") and None, "manifest lacks ['files']"),
    "files a list": (setter(["files"], []), "expected objects for config, normalization, io, files and backends"),
    "backends a string": (setter(["backends"], "onnxruntime"), "expected objects"),
    "config a string": (setter(["config"], "__import__('os')"), "expected objects"),
    "max_batch text": (setter(["max_batch"], "64; rm -rf /"), "expected max_batch an integer >= 1, found '64; rm -rf /'"),
    "max_batch 0": (setter(["max_batch"], 0), "expected max_batch an integer >= 1, found 0"),
    "max_batch bool": (setter(["max_batch"], True), "expected max_batch an integer >= 1, found True"),
    "sha not hex": (setter(["files", "model.onnx", "sha256"], "x" * 64), "expected files['model.onnx'] as"),
    "file record null": (setter(["files", "model.onnx"], None), "expected files['model.onnx'] as"),
    "path traversal": (setter(["files", "../good.pt"], {"sha256": "0" * 64, "bytes": 1}),
                       "file name '../good.pt' is not a plain relative path inside the directory"),
    "absolute path": (setter(["files", "/etc/passwd"], {"sha256": "0" * 64, "bytes": 1}),
                      "file name '/etc/passwd' is not a plain relative path"),
    "bad device": (setter(["backends", "onnxruntime", "device"], "abacus"),
                   "expected backends['onnxruntime'] with file, precision and device (cpu or cuda[:N])"),
    "entry null": (setter(["backends", "onnxruntime"], None), "expected backends['onnxruntime']"),
    "versions null": (setter(["versions"], None), "expected versions an object"),
    "config key": (setter(["config", "evil"], 1), "unknown config keys ['evil']"),
    "hub backbone": (setter(["config", "backbone"], "hf-hub:attacker/model"), "backbone must be a plain timm model name"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_or_malicious_manifest_is_refused(world, tmp_path, capsys, case):
    change, message = MALFORMED[case]
    d = copy_engine(world, tmp_path)
    rewrite_manifest(d, change)
    for backend in (None, "onnxruntime", "eager"):
        with pytest.raises(STVFMError) as info:
            Engine.load(d, backend=backend)
        assert message in str(info.value) and "\n" not in str(info.value), (backend, str(info.value))
    x, tod, dow = inputs(1, np.random.default_rng(0))
    np.savez(tmp_path / "in.npz", x=x, tod=tod, dow=dow)
    assert main(["run", str(d), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz")]) == 2
    assert message in one_error_line(capsys.readouterr().err, "run")
    assert not (tmp_path / "out.npz").exists()


def test_inspect_refuses_malformed_manifest(world, tmp_path, capsys):
    d = copy_engine(world, tmp_path)
    rewrite_manifest(d, setter(["files", "../../etc/shadow"], {"sha256": "0" * 64, "bytes": 1}))
    assert main(["inspect", str(d), "--verify"]) == 2
    assert "not a plain relative path" in one_error_line(capsys.readouterr().err, "inspect")


def _flip_byte(path: Path, at: int = -64) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def _swap_in_other_weights(path: Path) -> None:
    """A mix-up: valid weights of the same shapes from another model (another seed)."""
    from safetensors.torch import save_file

    other = build_model(CONFIG, seed=99)
    save_file({k: v.detach().contiguous().clone() for k, v in other.state_dict().items()}, str(path))


TAMPER = {
    # (file, how, backends that load it)
    "onnx bit flip": ("model.onnx", _flip_byte, [None, "onnxruntime"]),
    "onnx truncated": ("model.onnx", lambda p: p.write_bytes(p.read_bytes()[:1000]), [None, "onnxruntime"]),
    "onnx missing": ("model.onnx", lambda p: p.unlink(), [None, "onnxruntime"]),
    "weights bit flip": ("weights.safetensors", _flip_byte, ["eager", "triton"]),
    "weights from another model": ("weights.safetensors", _swap_in_other_weights, ["eager", "triton"]),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_files_are_refused_whatever_backend(world, tmp_path, capsys, case):
    name, how, backends = TAMPER[case]
    d = copy_engine(world, tmp_path)
    how(d / name)
    for backend in backends:
        with pytest.raises(EngineDirError) as info:
            Engine.load(d, backend=backend, device="cpu")
        msg = str(info.value)
        assert name in msg and ("does not match its sha256" in msg or "is missing" in msg) and "\n" not in msg
    x, tod, dow = inputs(2, np.random.default_rng(1))
    np.savez(tmp_path / "in.npz", x=x, tod=tod, dow=dow)
    out = tmp_path / "out.npz"
    assert main(["run", str(d), "--input", str(tmp_path / "in.npz"), "--output", str(out),
                 "--backend", backends[-1] if backends[-1] != "triton" else "eager"]) == 2
    assert name in one_error_line(capsys.readouterr().err, "run")
    assert not out.exists()
    assert main(["inspect", str(d), "--verify"]) == 2
    assert name in one_error_line(capsys.readouterr().err, "inspect")


def test_swapped_weights_would_change_results_without_the_check(world, tmp_path):
    """Why the sha256 matters: unverified, a mixed-up weights file serves silently wrong forecasts."""
    d = copy_engine(world, tmp_path)
    _swap_in_other_weights(d / "weights.safetensors")
    x, tod, dow = inputs(3, np.random.default_rng(2))
    wrong = Engine.load(d, backend="eager", verify=False).predict(x, tod, dow)
    right = Engine.load(world["engine"], backend="eager").predict(x, tod, dow)
    assert relative_error(wrong, right) > 1e-2
    with pytest.raises(EngineDirError, match="weights.safetensors does not match its sha256"):
        Engine.load(d, backend="eager")


def test_external_data_and_unbuilt_artifacts_are_verified(world, tmp_path):
    """An artifact's companion file (ONNX external data) is checked with it; so is a TensorRT plan,
    before TensorRT is needed at all."""
    d = copy_engine(world, tmp_path)
    (d / "model.onnx.data").write_bytes(b"external weights")
    rewrite_manifest(d, setter(["files", "model.onnx.data"], {"sha256": sha256_file(d / "model.onnx.data"), "bytes": 16}))
    Engine.load(d, backend="onnxruntime")  # listed and intact: loads
    (d / "model.onnx.data").write_bytes(b"external weightz")
    with pytest.raises(EngineDirError, match="model.onnx.data does not match its sha256"):
        Engine.load(d, backend="onnxruntime")
    (d / "model.onnx.data").write_bytes(b"external weights")  # intact again: only the plan is wrong below
    (d / "model.plan").write_bytes(b"plan")
    entry = {"file": "model.plan", "precision": "fp16", "device": "cuda", "parity": {}, "build_seconds": 1.0}

    def add_plan(m):
        m["backends"]["tensorrt"] = entry
        m["files"]["model.plan"] = {"sha256": "0" * 64, "bytes": 4}

    rewrite_manifest(d, add_plan)
    with pytest.raises(EngineDirError, match="model.plan does not match its sha256"):
        Engine.load(d, backend="tensorrt")


def test_hostile_backbone_source_in_a_checkpoint_is_refused(world, tmp_path):
    """timm resolves 'hf-hub:' / 'local-dir:' names by fetching or reading files: a checkpoint's config
    must not be able to make the loader reach the network or the file system."""
    for name in ("hf-hub:attacker/vit", "local-dir:/etc", "../../vit_tiny_patch16_224"):
        d = checkpoint_dict(world["model"])
        d["config"]["backbone"] = name
        torch.save(d, tmp_path / "hub.pt")
        with pytest.raises(CheckpointError, match="backbone must be a plain timm model name"):
            load_model(tmp_path / "hub.pt")


# ----------------------------------------------------------------------------- CLI errors, no partial outputs
def _run_argv(world, tmp_path, npz: dict) -> list[str]:
    np.savez(tmp_path / "in.npz", **npz)
    return ["run", str(world["engine"]), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz")]


def _good_npz(batch=2, seed=4):
    x, tod, dow = inputs(batch, np.random.default_rng(seed))
    return {"x": x, "tod": tod, "dow": dow}


RUN_ERRORS = {
    "rank": (lambda: {**_good_npz(), "x": _good_npz()["x"][:, 0]}, "expected x [B, 4, 2, 6, 5], got [2, 2, 6, 5]"),
    "grid": (lambda: {**_good_npz(), "x": np.random.default_rng(0).random((2, 4, 2, 5, 6), np.float32)},
             "expected x [B, 4, 2, 6, 5], got [2, 4, 2, 5, 6]"),
    "channels": (lambda: {**_good_npz(), "x": np.random.default_rng(0).random((2, 4, 3, 6, 5), np.float32)},
                 "expected x [B, 4, 2, 6, 5], got [2, 4, 3, 6, 5]"),
    "history": (lambda: {**_good_npz(), "x": np.random.default_rng(0).random((2, 5, 2, 6, 5), np.float32)},
                "expected x [B, 4, 2, 6, 5], got [2, 5, 2, 6, 5]"),
    "nan": (lambda: {**_good_npz(), "x": np.where(np.arange(480).reshape(2, 4, 2, 6, 5) % 7 == 0, np.nan,
                                                  _good_npz()["x"])}, "x holds 69 non-finite values"),
    "inf": (lambda: {**_good_npz(), "x": np.full((2, 4, 2, 6, 5), -np.inf, np.float32)}, "x holds 480 non-finite"),
    "float64 overflow": (lambda: {**_good_npz(), "x": np.full((2, 4, 2, 6, 5), 1e300)}, "non-finite"),
    "tod high": (lambda: {**_good_npz(), "tod": np.full((2, 4), 48)}, "tod must be in [0, 48), got values in [48, 48]"),
    "tod negative": (lambda: {**_good_npz(), "tod": np.arange(8).reshape(2, 4) - 3},
                     "tod must be in [0, 48), got values in [-3, 4]"),
    "dow 7": (lambda: {**_good_npz(), "dow": np.full((2, 4), 7, np.int32)}, "dow must be in [0, 7), got values in [7, 7]"),
    "tod missing": (lambda: {k: v for k, v in _good_npz().items() if k != "tod"},
                    "uses time inputs (steps_per_day=48): missing tod, int64 [2, 4]"),
    "tod and dow missing": (lambda: {"x": _good_npz()["x"]}, "missing tod and dow"),
    "batch above max": (lambda: _good_npz(batch=MAX_BATCH + 1), "batch 5 is outside this engine's range [1, 4]"),
    "tod float": (lambda: {**_good_npz(), "tod": np.full((2, 4), 1.5)}, "expected tod int64, got float64"),
    "unknown array": (lambda: {**_good_npz(), "y": np.ones(3)}, "expected arrays x (and tod, dow), found ['dow', 'tod', 'x', 'y']"),
    "x text": (lambda: {**_good_npz(), "x": np.array(["a", "b"])}, "expected x [B, 4, 2, 6, 5], got [2]"),
}


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_run_input_errors_are_one_line_and_leave_no_output(world, tmp_path, capsys, case):
    make, message = RUN_ERRORS[case]
    argv = _run_argv(world, tmp_path, make())
    (tmp_path / "out.npz").write_bytes(b"previous result")  # an earlier output must survive a failed run
    with warnings.catch_warnings(record=True) as caught:  # a warning would be a second stderr line
        warnings.simplefilter("always")
        assert main(argv) == 2
    assert not caught, [str(w.message) for w in caught]
    assert message in one_error_line(capsys.readouterr().err, "run")
    assert (tmp_path / "out.npz").read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "out.npz"]  # no temp files left


def test_run_succeeds_on_the_same_path_after_failures(world, tmp_path, capsys):
    """The error tests above are discriminating: the good input passes through the same command."""
    npz = _good_npz(batch=3, seed=8)
    assert main(_run_argv(world, tmp_path, npz)) == 0
    capsys.readouterr()
    with np.load(tmp_path / "out.npz") as out:
        with torch.inference_mode():
            ref = world["model"](*(torch.as_tensor(npz[k]) for k in ("x", "tod", "dow"))).numpy()
        assert relative_error(out["y"], ref) <= 1e-4


def test_command_errors_name_expected_and_found(world, tmp_path, capsys):
    other = write_flow_data(tmp_path / "other", np.random.default_rng(5), grid=(7, 5))
    (tmp_path / "a_dir").mkdir()
    cases = [
        (["build", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "e")], "not found (expected a file written by"),
        (["build", str(world["good"]), "-o", str(tmp_path / "e"), "--backends", "onnxruntime,bogus"],
         f"unknown backend 'bogus'; expected one of {list(names(artifact=True))}"),
        (["train", "--init", str(world["good"]), "--data", other, "--max-steps", "1", "-o", str(tmp_path / "t.pt")],
         "checkpoint expects C=2, grid 6x5;"),
        (["eval", str(world["good"]), "--data", str(tmp_path / "nothing")], "not found (expected"),
        (["inspect", str(tmp_path / "a_dir")], "not an engine directory (no manifest.json"),
        (["bench", str(world["engine"]), "--backends", "onnxruntime,abacus"], "unknown backend(s) ['abacus']"),
        (["init", "--backbone", "hf-hub:someone/vit", "-o", str(tmp_path / "i.pt")],
         "backbone must be a plain timm model name, got 'hf-hub:someone/vit'"),
        (["init", "--backbone-layers", "1", "-o", str(tmp_path / "a_dir")], "Is a directory"),
        (["init", "--backbone-layers", "1", "-o", "/proc/no_such_dir/i.pt"], "No such file or directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err, argv[0])
        assert message in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "other_test.npz", "other_train.npz", "other_val.npz"]
    assert not any((tmp_path / "a_dir").iterdir())


def test_failed_build_from_the_cli_keeps_old_dir_or_none(world, tmp_path, capsys, monkeypatch):
    old = copy_engine(world, tmp_path)
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def broken_gate(*args, **kwargs):
        raise ParityError("onnxruntime (fp32) fails the parity gate: injected")

    monkeypatch.setattr("stvfm_engine.export.build.check_parity", broken_gate)
    for target in (old, tmp_path / "fresh.engine"):
        assert main(["build", str(world["good"]), "-o", str(target), "--backends", "onnxruntime", "-q"]) == 2
        assert "fails the parity gate" in one_error_line(capsys.readouterr().err, "build")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.engine"]


def test_failed_or_interrupted_train_and_init_leave_no_checkpoint(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous checkpoint")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("stvfm_engine.model.train.train", interrupted)
    argv = ["train", "--init", str(world["good"]), "--data", world["data"], "--max-steps", "2", "--quiet", "-o", str(out)]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()

    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # half the file is on disk when the device fills up
            fh.truncate(Path(f).stat().st_size // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(["init", "--backbone-layers", "1", "-o", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err, "init")
    assert main(["train", "--init", str(world["good"]), "--data", world["data"], "--max-steps", "1", "--quiet",
                 "-o", str(out)]) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err, "train")
    assert out.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
