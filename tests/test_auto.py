"""``build --precision auto``: every candidate built and gated, the passing ones timed, the fastest of each
backend kept and the fastest of all the directory's default, which ``Engine.load(DIR)`` opens."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from helpers import random_inputs, reference_output, rel_err, write_checkpoint  # noqa: E402
from stvfm_engine.cli import main  # noqa: E402
from stvfm_engine.engine import Engine  # noqa: E402
from stvfm_engine.engine.manifest import read_manifest, verify_files  # noqa: E402
from stvfm_engine.engine.precision import PRECISIONS  # noqa: E402
from stvfm_engine.engine.registry import BACKENDS  # noqa: E402
from stvfm_engine.errors import STVFMError  # noqa: E402
from stvfm_engine.export.build import build_engine  # noqa: E402
from stvfm_engine.model.checkpoint import load_model  # noqa: E402
from stvfm_engine.model.config import from_preset  # noqa: E402
from stvfm_engine.model.data import synthetic_flow  # noqa: E402

TINY = from_preset("tiny", backbone_layers=1)
# the CPU candidates that build quickly (AOTInductor's bf16 compile takes minutes on 2 cores)
FAST = [b for b in ("onnxruntime", "openvino") if BACKENDS[b].why_not_run("cpu") is None]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("auto") / "tiny.pt", TINY)


def _check_choice(manifest):
    rows = manifest["auto"]["candidates"]
    assert [(r["backend"], r["precision"]) for r in rows] == [(b, p) for b in FAST for p in BACKENDS[b].auto]
    passed = [r for r in rows if r["p50_ms"] is not None]
    assert passed and all(r["max_rel_err"] <= PRECISIONS[r["precision"]].tolerance for r in passed)
    for r in rows:
        if r["p50_ms"] is None:  # not built here or failed a gate: never kept, always a reason
            assert not r["kept"] and r["why"]
    kept = {r["backend"]: r for r in rows if r["kept"]}
    assert set(kept) == set(manifest["backends"])  # one artifact per backend: its fastest passing precision
    for b, r in kept.items():
        assert manifest["backends"][b]["precision"] == r["precision"]
        assert r["p50_ms"] == min(x["p50_ms"] for x in passed if x["backend"] == b)
    best = min(passed, key=lambda r: r["p50_ms"])
    assert manifest["default"] == {"backend": best["backend"], "precision": best["precision"]}
    assert manifest["precision"] == best["precision"] and "default" in best["why"]


def test_auto_build_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "auto.engine"
    assert main(["build", str(ckpt), "-o", str(out), "--precision", "auto", "--backends", ",".join(FAST),
                 "--threads", "1", "--max-batch", "4"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "--precision auto: p50 at batch 1, 1 threads" in captured.err  # the table
    manifest = read_manifest(out)
    assert result["default"] == manifest["default"] and manifest["auto"]["threads"] == 1
    _check_choice(manifest)
    verify_files(out, manifest)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no scratch left
    engine = Engine.load(out)
    assert (engine.backend, engine.precision) == tuple(manifest["default"].values())
    model = load_model(ckpt)
    x, tod, dow = random_inputs(model, 3, np.random.default_rng(4))
    assert rel_err(engine.predict(x, tod, dow), reference_output(model, x, tod, dow)) <= PRECISIONS[engine.precision].tolerance


def test_auto_gated_on_the_task(ckpt, tmp_path):
    """With --calib-data every reduced candidate carries its test-MAE loss or, refused, the reason."""
    flow = synthetic_flow(steps=48 * 12, height=TINY.height, width=TINY.width, channels=TINY.channels, seed=5)
    prefix = tmp_path / "city"
    for split, part in zip(("train", "val", "test"), np.split(flow, [48 * 8, 48 * 10])):
        np.savez(f"{prefix}_{split}.npz", flow=part)
    out = build_engine(ckpt, tmp_path / "auto.engine", backends=FAST, precision="auto", max_batch=8, progress=False,
                       calib_data=prefix, max_mae_loss=0.002, threads=1)
    manifest = read_manifest(out)
    _check_choice(manifest)
    for r in manifest["auto"]["candidates"]:
        if r["precision"] == "fp32":  # measured too: the fp32 artifact against the fp32 reference
            assert abs(r["mae_loss"]) <= 1e-4 and r["p50_ms"] is not None
        elif r["p50_ms"] is not None:
            assert r["mae_loss"] <= 0.002
        elif not r["why"].startswith("cannot build here"):
            assert "task gate" in r["why"] and "> 0.2% allowed" in r["why"]
    default = manifest["backends"][manifest["default"]["backend"]]
    gate = default["reduced_precision"]["gate"] if default["precision"] != "fp32" else default["task_gate"]
    assert gate["gate"] == "test_mae" and gate["mae_loss"] <= 0.002


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "cuda"}, "auto chooses among CPU artifacts, not --device cuda"),
    ({"backends": ["eager"]}, "no candidates for \\['eager'\\]"),
    ({"backends": ["tensorrt"]}, "no candidates for \\['tensorrt'\\]"),
])
def test_auto_refusals_are_one_line(ckpt, tmp_path, kwargs, match):
    with pytest.raises(STVFMError, match=match) as info:
        build_engine(ckpt, tmp_path / "x", precision="auto", progress=False, **kwargs)
    assert "\n" not in str(info.value) and not (tmp_path / "x").exists()
