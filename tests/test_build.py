"""`build_engine` and the `build`/`inspect`/`env` CLI: artifacts, manifest, parity gate, atomic swaps.

Every artifact is compared with the fp32 reference model on fresh random inputs (never zeros) at odd
batch sizes: relative error ||y - y_ref|| / ||y_ref||. One tiny engine (ONNX + AOTInductor) is built
per module; odd configurations build the ONNX artifact only, plus one reduced-precision AOTInductor.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import check_reduced, CONFIGS, random_inputs, reference_output, relative_error, why_not_run, within, write_checkpoint
from stvfm_engine.cli import main
from stvfm_engine.engine import Engine, reference_model
from stvfm_engine.engine.manifest import read_manifest, sha256_file
from stvfm_engine.engine.precision import Precision
from stvfm_engine.errors import BuildError, ParityError, STVFMError
from stvfm_engine.export.build import build_engine, build_status
from stvfm_engine.export.parity import check_parity
from stvfm_engine.model.config import from_preset

# name -> config; each is small (1-2 blocks) and odd somewhere
ODD_CONFIGS = {
    # grid not divisible by the patch, C=3, no time inputs, distilled DeiT (2 prefix tokens)
    "deit-distilled-c3-13x7-p4-notime": CONFIGS["deit-tiny-distilled-c3-13x7-p4-T5-H2-notime"],
    # DINOv2 with 4 registers (5 prefix tokens), p=1, C=1, steps_per_day=24, 3 heads
    "dinov2-reg-c1-5x9-p1-time": CONFIGS["dinov2-small-reg4-c1-5x9-p1-T4-H3-day24"],
}


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """The tiny preset (1 block, time inputs) built for onnxruntime + aoti, max batch 8."""
    root = tmp_path_factory.mktemp("tiny")
    ckpt = write_checkpoint(root / "tiny.pt", from_preset("tiny", backbone_layers=1))
    out = build_engine(ckpt, root / "tiny.engine", backends=["onnxruntime", "aoti"], max_batch=8, progress=False)
    return ckpt, out


def test_directory_layout_and_manifest(tiny_engine):
    ckpt, out = tiny_engine
    m = read_manifest(out)
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "weights.safetensors", "model.onnx", "model.pt2"} <= names
    assert m["format_version"] == 1 and m["max_batch"] == 8 and m["precision"] == "fp32"
    assert m["checkpoint"]["sha256"] == sha256_file(ckpt)
    assert set(m["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    for rel, rec in m["files"].items():
        assert rec["sha256"] == sha256_file(out / rel) and rec["bytes"] == (out / rel).stat().st_size
    assert m["config"]["backbone_layers"] == 1 and m["config"]["heads"] == 3
    assert m["normalization"]["mean"] == pytest.approx([3.0, 9.0])
    assert [i["name"] for i in m["io"]["inputs"]] == ["x", "tod", "dow"]
    assert m["io"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", 12, 2, 14, 8]}
    assert m["io"]["dynamic_axes"]["batch"] == {"axis": 0, "min": 1, "max": 8}
    assert m["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(m["backends"]) == {"onnxruntime", "aoti"}
    for name, e in m["backends"].items():
        assert e["file"] == {"onnxruntime": "model.onnx", "aoti": "model.pt2"}[name]
        assert e["precision"] == "fp32" and e["device"] == "cpu" and e["build_seconds"] > 0
        assert set(e["parity"]["rel_err"]) == {"1", "5"}
        assert 0 < e["parity"]["max_rel_err"] <= 1e-4 == e["parity"]["tolerance"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp siblings left


def test_onnx_checks_and_runs_in_plain_onnxruntime(tiny_engine):
    import onnx
    import onnxruntime as ort

    _, out = tiny_engine
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [i.name for i in proto.graph.input] == ["x", "tod", "dow"] and [o.name for o in proto.graph.output] == ["y"]
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64,
                                                                         onnx.TensorProto.INT64]
    # TensorRT keeps these layers in fp32 for fp16/bf16 builds: they must exist as LayerNormalization
    assert sum(n.op_type == "LayerNormalization" for n in proto.graph.node) >= 5
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model = reference_model(out)
    rng = np.random.default_rng(1)
    for batch in (1, 3, 8):
        x, tod, dow = random_inputs(model, batch, rng)
        y = sess.run(["y"], {"x": x, "tod": tod, "dow": dow})[0]
        assert relative_error(y, reference_output(model, x, tod, dow)) <= 1e-4


def test_reference_model_matches_checkpoint(tiny_engine):
    from stvfm_engine.model.checkpoint import load_model

    ckpt, out = tiny_engine
    a, b = load_model(ckpt), reference_model(out)
    x, tod, dow = random_inputs(a, 3, np.random.default_rng(2))
    np.testing.assert_array_equal(reference_output(a, x, tod, dow), reference_output(b, x, tod, dow))


@pytest.mark.parametrize("name", sorted(ODD_CONFIGS))
def test_odd_configuration_onnx(tmp_path, name):
    ckpt = write_checkpoint(tmp_path / "odd.pt", ODD_CONFIGS[name], seed=3)
    out = build_engine(ckpt, tmp_path / "odd.engine", backends="onnxruntime", max_batch=7, progress=False)
    m = read_manifest(out)
    assert m["backends"]["onnxruntime"]["parity"]["max_rel_err"] <= 1e-4
    assert set(m["backends"]["onnxruntime"]["parity"]["rel_err"]) == {"1", "5"}
    model = reference_model(out)
    rng = np.random.default_rng(4)
    for backend in ("onnxruntime", "eager"):
        engine = Engine.load(out, backend=backend)
        for batch in (1, 2, 7):
            x, tod, dow = random_inputs(model, batch, rng)
            y = engine.predict(x, tod, dow)
            assert y.dtype == np.float32 and y.shape == (batch, model.config.horizon, *x.shape[2:])
            assert relative_error(y, reference_output(model, x, tod, dow)) <= 1e-4, (backend, batch)


def test_reduced_precision_aoti_odd_configuration(tmp_path):
    """bf16 AOTInductor on the C=3 / 13x7 / p=4 / no-time DeiT: gate 2e-2, and measured, not assumed."""
    ckpt = write_checkpoint(tmp_path / "odd.pt", ODD_CONFIGS["deit-distilled-c3-13x7-p4-notime"], seed=5)
    out = build_engine(ckpt, tmp_path / "bf16.engine", backends=["aoti"], precision="bf16", max_batch=5, progress=False)
    entry = read_manifest(out)["backends"]["aoti"]
    assert entry["precision"] == "bf16" and entry["parity"]["tolerance"] == 2e-2
    check_reduced(entry["parity"]["max_rel_err"], "bf16")
    engine = Engine.load(out)
    assert (engine.backend, engine.precision) == ("aoti", "bf16")
    model = reference_model(out)
    x, _, _ = random_inputs(model, 3, np.random.default_rng(6))
    assert within(relative_error(engine.predict(x), reference_output(model, x, None, None)), "bf16")
    with pytest.raises(STVFMError, match="aoti artifact is bf16, not fp32"):
        Engine.load(out, backend="aoti", precision="fp32")


def test_parity_gate_rejects_a_wrong_artifact(tiny_engine):
    _, out = tiny_engine
    model = reference_model(out)
    engine = Engine.load(out, backend="onnxruntime")
    strict = Precision("fp32", torch.float32, 1e-12)
    with pytest.raises(ParityError, match=r"onnxruntime \(fp32\) fails the parity gate: relative error .* > 1e-12"):
        check_parity("onnxruntime", engine._runner, model, strict, max_batch=8)

    def off_by_one(x, tod, dow):
        return engine._runner(x, tod, dow) * 1.001

    with pytest.raises(ParityError):
        check_parity("onnxruntime", off_by_one, model, Precision("fp32", torch.float32, 1e-4), max_batch=8)


def test_failed_build_keeps_old_directory_and_cleans_stale_siblings(tiny_engine, tmp_path, monkeypatch):
    ckpt, out = tiny_engine
    target = tmp_path / "eng"
    shutil.copytree(out, target)
    before = (target / "manifest.json").read_bytes()
    stale = tmp_path / ".eng.build-999999999-abc"  # a dead process's temp sibling
    stale.mkdir()
    (stale / "junk").write_text("x")
    stranded = tmp_path / ".eng.old-999999998-abc"
    stranded.mkdir()

    def broken(*args, **kwargs):
        raise ParityError("injected failure")

    monkeypatch.setattr("stvfm_engine.export.build.check_parity", broken)
    with pytest.raises(ParityError, match="injected"):
        build_engine(ckpt, target, backends=["onnxruntime"], progress=False)
    assert (target / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]  # stale siblings gone, no new ones
    with pytest.raises(ParityError):
        build_engine(ckpt, tmp_path / "new", backends=["onnxruntime"], progress=False)
    assert not (tmp_path / "new").exists()


def test_successful_rebuild_replaces_directory(tiny_engine, tmp_path):
    ckpt, out = tiny_engine
    target = tmp_path / "eng"
    shutil.copytree(out, target)
    (target / "leftover.txt").write_text("from the old build")
    build_engine(ckpt, target, backends=["onnxruntime"], max_batch=3, progress=False)
    m = read_manifest(target)
    assert set(m["backends"]) == {"onnxruntime"} and m["max_batch"] == 3
    assert not (target / "leftover.txt").exists() and not (target / "model.pt2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_build_refuses_to_replace_non_engine_paths(tiny_engine, tmp_path):
    ckpt, _ = tiny_engine
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not an engine directory"):
        build_engine(ckpt, precious, backends=["onnxruntime"], progress=False)
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(BuildError, match="not a directory"):
        build_engine(ckpt, tmp_path / "file", backends=["onnxruntime"], progress=False)
    assert (precious / "data.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, match", [
    ({"backends": ["tensorrt"]}, "cannot build tensorrt for cpu"),
    ({"backends": ["eager"]}, "runs from the weights"),
    ({"backends": ["bogus"]}, "unknown backend 'bogus'"),
    ({"backends": ["onnxruntime"], "precision": "bf16"}, "onnxruntime builds fp32, int8 only"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"device": "tpu"}, "device"),
])
def test_build_option_errors_are_one_line(tiny_engine, tmp_path, kwargs, match):
    ckpt, _ = tiny_engine
    with pytest.raises(STVFMError, match=match) as info:
        build_engine(ckpt, tmp_path / "x", progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()


def test_default_backends_are_what_this_machine_builds():
    expected = [b for b in ("onnxruntime", "aoti", "tensorrt") if build_status(b, "cpu", "fp32") is None]
    assert expected[:2] == ["onnxruntime", "aoti"]  # a CPU machine with a compiler
    assert "tensorrt" not in expected


def test_cli_build_inspect_env(tiny_engine, tmp_path, capsys):
    ckpt, out = tiny_engine
    assert main(["build", str(ckpt), "-o", str(tmp_path / "cli.engine"), "--backends", "onnxruntime",
                 "--max-batch", "4"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds only the result
    assert result["backends"]["onnxruntime"]["max_rel_err"] <= 1e-4
    assert "parity gate" in captured.err  # progress went to stderr

    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "aoti" in text and "model.pt2" in text and "files match" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backends"]["aoti"]["file"] == "model.pt2"

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backends"]["onnxruntime"]["run_cpu"] is None
    assert "untested here" in report["backends"]["tensorrt"]["note"]
    assert main(["env"]) == 0
    assert "untested here" in capsys.readouterr().out

    assert main(["build", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stvfm-engine build: error:") and "not found" in err and "\n" not in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not an engine directory" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(why_not_run("tensorrt", "cuda") is not None,
                    reason=f"TensorRT engine builds need TensorRT and a CUDA GPU: {why_not_run('tensorrt', 'cuda')}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_build_and_parity(tmp_path, precision):
    ckpt = write_checkpoint(tmp_path / "tiny.pt", from_preset("tiny", backbone_layers=2))
    out = build_engine(ckpt, tmp_path / "trt.engine", backends=["tensorrt"], precision=precision, device="cuda",
                       max_batch=8, progress=False)
    m = read_manifest(out)
    assert (out / "model.plan").is_file() and (out / "model.timing.cache").is_file()
    assert m["backends"]["tensorrt"]["parity"]["max_rel_err"] <= m["backends"]["tensorrt"]["parity"]["tolerance"]
    engine = Engine.load(out, backend="tensorrt")
    model = reference_model(out)
    x, tod, dow = random_inputs(model, 3, np.random.default_rng(7))
    assert within(relative_error(engine.predict(x, tod, dow), reference_output(model, x, tod, dow)), precision)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_aoti_build(tmp_path):
    ckpt = write_checkpoint(tmp_path / "tiny.pt", from_preset("tiny", backbone_layers=2))
    out = build_engine(ckpt, tmp_path / "cuda.engine", backends=["aoti"], device="cuda", max_batch=8, progress=False)
    entry = read_manifest(out)["backends"]["aoti"]
    assert entry["device"].startswith("cuda") and entry["parity"]["max_rel_err"] <= 1e-4
    engine = Engine.load(out)
    assert engine.backend == "aoti" and engine.device.startswith("cuda")
