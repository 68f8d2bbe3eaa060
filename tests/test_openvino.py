"""The OpenVINO backend: IR build and parity at fp32 (explicit f32 hint), bf16 where the CPU has it,
int8 by NNCF on synthetic or data windows; threads, several callers, version check, registry reach."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install -e '.[openvino]')")
pytest.importorskip("onnxruntime")

from helpers import check_reduced, random_inputs, reference_output, rel_err, within, write_checkpoint  # noqa: E402
from stvfm_engine.engine import Engine  # noqa: E402
from stvfm_engine.engine.backends import openvino as ov_backend  # noqa: E402
from stvfm_engine.engine.manifest import write_manifest  # noqa: E402
from stvfm_engine.engine.registry import BACKENDS  # noqa: E402
from stvfm_engine.export.build import build_engine  # noqa: E402
from stvfm_engine.model.checkpoint import load_model  # noqa: E402
from stvfm_engine.model.config import from_preset  # noqa: E402
from stvfm_engine.model.data import synthetic_flow  # noqa: E402
from stvfm_engine.errors import BackendError, BuildError

TINY = from_preset("tiny", backbone_layers=1)
HAS_BF16 = "BF16" in ov_backend.cpu_capabilities()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ov") / "tiny.pt", TINY)


@pytest.fixture(scope="module")
def fp32_engine(ckpt, tmp_path_factory):
    return build_engine(ckpt, tmp_path_factory.mktemp("ov") / "fp32.engine", backends=["openvino"], max_batch=8,
                        progress=False)


def test_fp32_build_and_parity(ckpt, fp32_engine):
    manifest = json.loads((fp32_engine / "manifest.json").read_text())
    entry = manifest["backends"]["openvino"]
    assert entry["file"] == "model.xml" and {"model.xml", "model.bin"} <= set(manifest["files"])
    assert entry["runtime"] == {"inference_precision_hint": "f32"}  # never left to the CPU's default
    assert entry["parity"]["max_rel_err"] <= 1e-4 and manifest["versions"]["openvino"]
    assert not (fp32_engine / ".export").exists() and not (fp32_engine / "model.onnx").exists()
    model = load_model(ckpt)
    engine = Engine.load(fp32_engine, backend="openvino", threads=1)
    assert engine._runner.threads == 1  # INFERENCE_NUM_THREADS as compiled
    for batch in (1, 3, 8):  # the dynamic batch axis, up to max_batch
        x, tod, dow = random_inputs(model, batch, np.random.default_rng(batch))
        assert rel_err(engine.predict(x, tod, dow), reference_output(model, x, tod, dow)) <= 1e-4
    with pytest.raises(Exception, match="batch"):
        engine.predict(*random_inputs(model, 9, np.random.default_rng(0)))


def test_several_threads_bit_identical(ckpt, fp32_engine):
    engine = Engine.load(fp32_engine, backend="openvino", threads=2)
    model = load_model(ckpt)
    inputs = [random_inputs(model, b, np.random.default_rng(10 + b)) for b in (1, 2, 5)]
    expected = [engine.predict(*a) for a in inputs]
    failures = []

    def worker(k):
        for i in range(6):
            j = (k + i) % len(inputs)
            if not np.array_equal(engine.predict(*inputs[j]), expected[j]):
                failures.append((k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_newer_build_refused(fp32_engine, tmp_path):
    import shutil

    d = tmp_path / "copy.engine"
    shutil.copytree(fp32_engine, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["versions"]["openvino"] = "9999.1.0"
    write_manifest(d, manifest)
    with pytest.raises(BackendError, match=r"openvino 9999\.1\.0.*rebuild"):
        Engine.load(d, backend="openvino")
    assert Engine.load(d).backend != "openvino"  # the default skips what cannot load here


def test_int8_synthetic_calibration(ckpt, tmp_path):
    out = build_engine(ckpt, tmp_path / "int8.engine", backends=["openvino"], precision="int8", max_batch=4,
                       progress=False)
    entry = Engine.load(out).manifest["backends"]["openvino"]
    q = entry["reduced_precision"]["quantization"]
    assert q["quantized_nodes"] == 4 and q["scope"] == "backbone"  # qkv, proj, fc1, fc2 of the one block
    assert q["calibration"]["source"].startswith("synthetic") and q["calibration"]["windows"] > 100
    check_reduced(entry["parity"]["max_rel_err"], "int8", floor=1e-5)
    model = load_model(ckpt)
    x, tod, dow = random_inputs(model, 3, np.random.default_rng(7))
    y = Engine.load(out, backend="openvino").predict(x, tod, dow)
    assert within(rel_err(y, reference_output(model, x, tod, dow)), "int8")


def test_int8_calibrated_and_gated_on_data(ckpt, tmp_path):
    """--calib-data: NNCF calibrates on its train windows, and the task gate measures test MAE vs fp32."""
    model = load_model(ckpt)
    flow = synthetic_flow(steps=48 * 12, height=TINY.height, width=TINY.width, channels=TINY.channels, seed=3)
    prefix = tmp_path / "city"
    for split, part in zip(("train", "val", "test"), np.split(flow, [48 * 8, 48 * 10])):
        np.savez(f"{prefix}_{split}.npz", flow=part)
    out = build_engine(ckpt, tmp_path / "int8.engine", backends=["openvino"], precision="int8", max_batch=8,
                       progress=False, calib_data=prefix, max_mae_loss=0.05)
    rp = Engine.load(out).manifest["backends"]["openvino"]["reduced_precision"]
    assert rp["quantization"]["calibration"]["source"] == f"train windows of {prefix}"
    assert rp["gate"]["gate"] == "test_mae" and rp["gate"]["passed"] and abs(rp["gate"]["mae_loss"]) <= 0.05
    assert model.config == load_model(ckpt).config


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 for OpenVINO (its CPU plugin reports no BF16); "
                                         "the refusal is tested below")
def test_bf16_build_and_parity(ckpt, tmp_path):
    out = build_engine(ckpt, tmp_path / "bf16.engine", backends=["openvino"], precision="bf16", max_batch=4,
                       progress=False)
    engine = Engine.load(out, backend="openvino")
    assert engine.manifest["backends"]["openvino"]["runtime"] == {"inference_precision_hint": "bf16"}
    model = load_model(ckpt)
    x, tod, dow = random_inputs(model, 3, np.random.default_rng(9))
    err = rel_err(engine.predict(x, tod, dow), reference_output(model, x, tod, dow))
    check_reduced(err, "bf16", floor=1e-5)


@pytest.mark.skipif(HAS_BF16, reason="this CPU has bf16: the build is tested above")
def test_bf16_refused_where_the_cpu_lacks_it(ckpt, tmp_path):
    with pytest.raises(BuildError, match="no BF16 support on this CPU"):
        build_engine(ckpt, tmp_path / "bf16.engine", backends=["openvino"], precision="bf16", progress=False)
    assert not (tmp_path / "bf16.engine").exists()


def test_known_to_env_inspect_run(fp32_engine, ckpt, tmp_path):
    assert BACKENDS["openvino"].why_not_run("cpu") is None
    env = subprocess.run([sys.executable, "-m", "stvfm_engine", "env", "--json"], capture_output=True, text=True,
                         timeout=300)
    row = json.loads(env.stdout)["backends"]["openvino"]
    assert row["run_cpu"] is None and row["build_cpu"]["fp32"] is None and row["build_cuda"]
    inspect = subprocess.run([sys.executable, "-m", "stvfm_engine", "inspect", str(fp32_engine), "--verify"],
                             capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0 and "openvino" in inspect.stdout and "model.xml" in inspect.stdout
    model = load_model(ckpt)
    x, tod, dow = random_inputs(model, 2, np.random.default_rng(1))
    np.savez(tmp_path / "in.npz", x=x, tod=tod, dow=dow)
    run = subprocess.run([sys.executable, "-m", "stvfm_engine", "run", str(fp32_engine), "--input",
                          str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"), "--backend", "openvino"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert rel_err(np.load(tmp_path / "out.npz")["y"], reference_output(model, x, tod, dow)) <= 1e-4
