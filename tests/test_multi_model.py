"""Multi-model engines: several models on one frozen backbone in one directory.

Checkpoints of different configurations share one (1-block, random) backbone the way a user makes
them, `init --backbone-weights` or its Python equivalent (`load_backbone_weights`). Every output is
compared on fresh random inputs with each model's own one-model engine and fp32 reference model:
relative error ||y - y_ref|| / ||y_ref||. One build cache serves the module, so the later builds show
which artifacts it skipped.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import CONFIGS, one_error_line, random_inputs, reference_output, rel_err, write_checkpoint
from stvfm_engine.cli import main
from stvfm_engine.engine import Engine
from stvfm_engine.engine.manifest import is_multi, read_manifest, sha256_file
from stvfm_engine.engine.multi import Request, schedule
from stvfm_engine.errors import BuildError, InputError, STVFMError
from stvfm_engine.export.build import build_engine
from stvfm_engine.export.cache import BuildCache
from stvfm_engine.export.multi_build import build_multi_engine
from stvfm_engine.model.checkpoint import load_model, save_checkpoint
from stvfm_engine.model.train import load_backbone_weights

MODELS = {
    # 14x8 at p=2: 28 tokens + the class token = sequences of 29; time inputs
    "bike": CONFIGS["vit-tiny-c2-14x8-p2-T12-H1-day48"],
    # 10x6 at p=2: 15 tokens (sequences of 16); C=3, no time inputs, horizon 3
    "taxi": CONFIGS["vit-tiny-c3-10x6-p2-T6-H3-notime"],
    # 8x14 at p=2: 28 tokens like bike (shares its backbone calls), C=1, 24 steps a day
    "subway": CONFIGS["vit-tiny-c1-8x14-p2-T5-H2-day24"],
}
MAX_BATCH = 6
TOL = 1e-5  # fp32: multi-model vs one-model engines, and vs the reference


def shared_checkpoint(path, config, seed, backbone_from):
    """A random-weight checkpoint of ``config`` whose backbone is loaded from ``backbone_from`` (a checkpoint)."""
    write_checkpoint(path, config, seed=seed)
    model = load_model(path)
    load_backbone_weights(model, backbone_from)
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    ckpts = {"bike": write_checkpoint(root / "bike.pt", MODELS["bike"], seed=1)}
    for i, name in enumerate(("taxi", "subway"), start=2):
        ckpts[name] = shared_checkpoint(root / f"{name}.pt", MODELS[name], seed=i, backbone_from=ckpts["bike"])
    cache = root / "cache"
    multi = build_multi_engine([ckpts["bike"], ckpts["taxi"]], root / "nyc.engine", max_batch=MAX_BATCH,
                               cache_dir=cache, progress=False)
    singles = {n: build_engine(ckpts[n], root / f"{n}.engine", backends=["onnxruntime"], max_batch=MAX_BATCH,
                               progress=False) for n in ("bike", "taxi")}
    return {"root": root, "ckpts": ckpts, "cache": cache, "multi": multi, "singles": singles,
            "refs": {n: load_model(p) for n, p in ckpts.items()}}


def inputs_for(world, name, batch, rng):
    return random_inputs(world["refs"][name], batch, rng)


# ----------------------------------------------------------------------------- the directory and its runtime
def test_backbone_stored_once_and_parts_apart(world):
    m = read_manifest(world["multi"])
    assert is_multi(m) and m["format_version"] == 2 and list(m["models"]) == ["bike", "taxi"]
    files = m["files"]
    assert {"backbone.safetensors", "backbone.onnx", "models/bike/weights.safetensors", "models/bike/pre.onnx",
            "models/bike/post.onnx", "models/taxi/pre.onnx", "models/taxi/post.onnx"} <= set(files)
    assert not any(f.endswith(("model.onnx", "weights.safetensors")) and "/" not in f for f in files)
    single = load_file(world["singles"]["bike"] / "weights.safetensors")
    backbone = load_file(world["multi"] / "backbone.safetensors")
    for name in ("bike", "taxi"):
        own = load_file(world["multi"] / "models" / name / "weights.safetensors")
        assert not any(k.startswith("backbone.") for k in own) and set(backbone) | set(own) == \
            set(world["refs"][name].state_dict())
    assert set(backbone) == {k for k in single if k.startswith("backbone.")}
    assert all(torch.equal(backbone[k], single[k]) for k in backbone)
    assert [m["models"][n]["sequence_length"] for n in ("bike", "taxi")] == [29, 16]
    for name, entry in m["models"].items():
        assert entry["checkpoint"]["sha256"] == sha256_file(world["ckpts"][name])
        assert entry["backends"]["onnxruntime"]["parity"]["max_rel_err"] <= 1e-4


@pytest.mark.parametrize("backend", ["onnxruntime", "eager"])
def test_each_model_matches_its_one_model_engine(world, backend):
    engine = Engine.load(world["multi"], backend=backend, threads=1)
    assert engine.models == {n: world["refs"][n].config for n in ("bike", "taxi")} and engine.max_batch == MAX_BATCH
    rng = np.random.default_rng(7)
    for name in ("bike", "taxi"):
        alone = Engine.load(world["singles"][name], backend=backend, threads=1)
        for batch in (1, 4, MAX_BATCH):
            x, tod, dow = inputs_for(world, name, batch, rng)
            y = engine.predict(x, tod, dow, model=name)
            c = engine.models[name]
            assert y.dtype == np.float32 and y.shape == (batch, c.horizon, c.channels, c.height, c.width)
            assert rel_err(y, alone.predict(x, tod, dow)) <= TOL, (name, batch)
            assert rel_err(y, reference_output(world["refs"][name], x, tod, dow)) <= TOL, (name, batch)


def test_the_backbone_is_held_once_by_the_eager_backend(world):
    parts = Engine.load(world["multi"], backend="eager")._runner
    blocks = {n: m.backbone.blocks for n, m in parts.models.items()}
    assert blocks["bike"] is blocks["taxi"]


def test_backbone_shared_with_another_engine(world):
    """What ``serve`` does across processes: one engine runs only the backbone (``run_backbone``), another
    only the models' parts (``share_backbone``); the answers stay those of the one-process engine, and
    the parts-only engine never opens the backbone."""
    holder = Engine.load(world["multi"], backend="onnxruntime", threads=1)
    worker = Engine.load(world["multi"], backend="onnxruntime", threads=1)
    whole = Engine.load(world["multi"], backend="onnxruntime", threads=1)
    passes = []
    worker.share_backbone(lambda tokens: passes.append(tokens.shape) or holder.run_backbone(tokens))
    rng = np.random.default_rng(11)
    requests = [("bike", *inputs_for(world, "bike", 2, rng)), ("taxi", inputs_for(world, "taxi", 3, rng)[0]),
                ("bike", *inputs_for(world, "bike", 1, rng))]
    for y, ref in zip(worker.predict_many(requests), whole.predict_many(requests)):
        assert rel_err(y, ref) <= TOL
    assert passes == [(6, 29, 192), (6, 16, 192)] and holder.backbone_calls == 2
    assert ("", "backbone") not in worker._runner._parts._sessions  # lazily opened: never, here
    with pytest.raises(InputError, match=r"tokens: expected float32 \[N, L, D\] with N in 1..12 and L one of \[16, 29\]"):
        holder.run_backbone(np.ones((2, 17, 192), np.float32))
    with pytest.raises(STVFMError, match="one-model engine"):
        Engine.load(world["singles"]["bike"], backend="onnxruntime").run_backbone(np.ones((2, 29, 192), np.float32))


def test_one_model_directory_keeps_working(world):
    d = world["singles"]["bike"]
    m = read_manifest(d)
    assert m["format_version"] == 1 and {"config", "normalization", "io", "max_batch", "checkpoint"} <= set(m)
    engine = Engine.load(d)
    assert engine.models == {"bike.engine": world["refs"]["bike"].config} and engine.config == engine.models["bike.engine"]
    x, tod, dow = inputs_for(world, "bike", 2, np.random.default_rng(1))
    y = engine.predict(x, tod, dow)
    np.testing.assert_array_equal(engine.predict(x, tod, dow, model="bike.engine"), y)
    ys = engine.predict_many([("bike.engine", x[:1], tod[:1], dow[:1]), ("bike.engine", x[1:], tod[1:], dow[1:])])
    assert rel_err(np.concatenate(ys), y) <= TOL
    with pytest.raises(InputError, match=r"unknown model 'taxi'; this engine serves \['bike.engine'\]"):
        engine.predict(x, tod, dow, model="taxi")


# ----------------------------------------------------------------------------- predict_many
def test_schedule_groups_by_length_and_respects_max_batch():
    reqs = [Request(m, np.zeros((b, 1)), None, None, length) for m, b, length in
            [("a", 2, 29), ("c", 1, 16), ("b", 3, 29), ("a", 2, 29), ("c", 6, 16), ("b", 1, 29)]]
    assert schedule(reqs, 6) == [[0, 2], [3, 5], [1], [4]]
    assert schedule(reqs, 100) == [[0, 2, 3, 5], [1, 4]]


@pytest.fixture(scope="module")
def three(world):
    """bike, taxi and subway (bike's sequence length) in one engine; bike/taxi artifacts come from the cache."""
    ck = world["ckpts"]
    return build_multi_engine([ck["bike"], ck["taxi"], ck["subway"]], world["root"] / "three.engine",
                              max_batch=MAX_BATCH, cache_dir=world["cache"], progress=False)


def test_adding_a_model_reuses_the_cached_backbone_and_parts(three):
    m = read_manifest(three)
    assert m["backends"]["onnxruntime"]["cache"] == "hit"
    assert {n: e["backends"]["onnxruntime"]["cache"] for n, e in m["models"].items()} == \
        {"bike": "hit", "taxi": "hit", "subway": "miss"}
    # the same artifacts already passed the gate against the same weights: the recorded result is reused
    assert {n: e["backends"]["onnxruntime"]["parity"]["cache"] for n, e in m["models"].items()} == \
        {"bike": "hit", "taxi": "hit", "subway": "miss"}


@pytest.mark.parametrize("backend", ["onnxruntime", "eager"])
def test_predict_many_mixed_shuffled_list(world, three, backend):
    engine = Engine.load(three, backend=backend, threads=1)
    rng = np.random.default_rng(3)
    # bike + subway share sequence length 29 (batches 2+1+3+2+1 = 9 > 6: two calls), taxi has 16 (1+2: one call)
    wanted = [("bike", 2), ("taxi", 1), ("subway", 1), ("bike", 3), ("taxi", 2), ("subway", 2), ("bike", 1)]
    order = rng.permutation(len(wanted))
    requests = [(name, *inputs_for(world, name, batch, rng)) for name, batch in (wanted[i] for i in order)]
    requests = [r[:2] if world["refs"][r[0]].config.steps_per_day == 0 else r for r in requests]  # taxi: x only
    seen = []
    backbone = engine._runner.backbone
    engine._runner.backbone = lambda tokens: seen.append(tuple(tokens.shape[:2])) or backbone(tokens)
    before = engine.backbone_calls
    ys = engine.predict_many(requests)
    assert len(seen) == 3 == engine.backbone_calls - before
    for length, samples in ((29, 9), (16, 3)):  # 2B sequences per call, at most 2 * max_batch
        assert sum(n for n, L in seen if L == length) == 2 * samples
    assert all(n <= 2 * MAX_BATCH for n, _ in seen)
    for (name, *args), y in zip(requests, ys):
        args += [None] * (3 - len(args))
        assert rel_err(y, reference_output(world["refs"][name], *args)) <= TOL, name
        assert rel_err(y, engine.predict(*args, model=name)) <= TOL, name


def test_bad_requests_are_one_line_errors_naming_the_request(world):
    engine = Engine.load(world["multi"], backend="eager")
    x, tod, dow = inputs_for(world, "bike", 1, np.random.default_rng(0))
    cases = [
        (lambda: engine.predict(x, tod, dow), r"serves 2 models \['bike', 'taxi'\]: pass model=NAME"),
        (lambda: engine.predict(x, tod, dow, model="subway"), r"unknown model 'subway'"),
        (lambda: engine.predict_many([("bike", x, tod, dow), ("taxi", x)]), r"request 1: expected x \[B, 6, 3, 10, 6\]"),
        (lambda: engine.predict_many([("bike", x, tod, dow), "taxi"]), r"request 1: expected \(model, x, tod, dow\)"),
        (lambda: engine.predict_many(("bike", x, tod, dow)), r"request 0: expected \(model, x, tod, dow\)"),
        (lambda: engine.predict_many([("bike", np.repeat(x, 7, 0), np.repeat(tod, 7, 0), np.repeat(dow, 7, 0))]),
         r"request 0: batch 7 is outside this engine's range \[1, 6\]"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(STVFMError, match="use engine.models"):
        engine.config  # noqa: B018 - the property raises
    with pytest.raises(STVFMError, match="cannot serve that|cannot run on cpu"):  # the latter without triton
        Engine.load(world["multi"], backend="triton")
    with pytest.raises(STVFMError, match="holds no aoti artifact"):
        Engine.load(world["multi"], backend="aoti")


# ----------------------------------------------------------------------------- build refusals and the cache
def test_mismatched_backbones_are_refused_by_name(world, tmp_path, capsys):
    ck = world["ckpts"]
    other = write_checkpoint(tmp_path / "other.pt", MODELS["taxi"], seed=9)  # its own random backbone
    deeper = write_checkpoint(tmp_path / "deeper.pt", MODELS["taxi"].replace(backbone_layers=2), seed=2)
    out = tmp_path / "bad.engine"
    with pytest.raises(BuildError, match=r"other.pt: backbone tensor backbone\.\S+ differs from \S*bike.pt's"):
        build_multi_engine([ck["bike"], other], out, cache_dir=world["cache"], progress=False)
    with pytest.raises(BuildError, match=r"deeper.pt: backbone vit_tiny_patch16_224 with 2 layers, but \S*bike.pt has "
                                         r"vit_tiny_patch16_224 with 1"):
        build_multi_engine([ck["bike"], deeper], out, cache_dir=world["cache"], progress=False)
    assert main(["build", str(ck["bike"]), str(other), "-o", str(out), "-q", "--cache-dir", str(world["cache"])]) == 2
    assert "other.pt: backbone tensor backbone." in one_error_line(capsys.readouterr().err, "build")
    for argv, message in [(["--names", "a,a"], "two models would share the name 'a'"),
                          (["--names", "a"], "got 1 names for 2 checkpoints"),
                          (["--names", "a,../b"], "model name '../b' is not usable"),
                          (["--backends", "aoti"], "cannot build aoti for a multi-model engine"),
                          (["--precision", "int8"], "multi-model engines are built at fp32 only")]:
        assert main(["build", str(ck["bike"]), str(ck["taxi"]), "-o", str(out), "-q", *argv]) == 2
        assert message in one_error_line(capsys.readouterr().err, "build"), argv
    assert not out.exists()


def test_rebuild_after_retraining_one_model_hits_the_cache_and_corrupt_entries_are_rebuilt(world, tmp_path):
    ck, cache = world["ckpts"], world["cache"]
    retrained = load_model(ck["bike"])  # "retraining": only the model's own weights change
    with torch.no_grad():
        retrained.head.weight.add_(0.05 * torch.randn_like(retrained.head.weight))
    save_checkpoint(retrained, tmp_path / "bike.pt")
    out = build_multi_engine([tmp_path / "bike.pt", ck["taxi"]], tmp_path / "nyc.engine", max_batch=MAX_BATCH,
                             cache_dir=cache, progress=False)
    m = read_manifest(out)
    assert m["backends"]["onnxruntime"]["cache"] == "hit"
    assert {n: e["backends"]["onnxruntime"]["cache"] for n, e in m["models"].items()} == {"bike": "miss", "taxi": "hit"}
    assert m["models"]["bike"]["backends"]["onnxruntime"]["parity"]["cache"] == "miss"  # gated now
    assert m["models"]["bike"]["backends"]["onnxruntime"]["parity"]["max_rel_err"] <= 1e-4
    x, tod, dow = inputs_for(world, "bike", 3, np.random.default_rng(5))
    y = Engine.load(out).predict(x, tod, dow, model="bike")
    assert rel_err(y, reference_output(retrained, x, tod, dow)) <= TOL
    assert rel_err(y, reference_output(world["refs"]["bike"], x, tod, dow)) > 1e-3  # the new weights are served

    entries = [p.parent for p in cache.rglob("entry.json") if json.loads(p.read_text())["about"]["artifact"] == "backbone"]
    assert len(entries) == 1
    with open(entries[0] / "backbone.onnx", "r+b") as f:  # flip a byte in the cached backbone
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = build_multi_engine([tmp_path / "bike.pt", ck["taxi"]], tmp_path / "nyc.engine", max_batch=MAX_BATCH,
                               cache_dir=cache, progress=False)
    assert read_manifest(again)["backends"]["onnxruntime"]["cache"] == "rebuilt"
    assert rel_err(Engine.load(again).predict(x, tod, dow, model="bike"), y) <= TOL
    roles, status = BuildCache(cache).fetch(entries[0].name, tmp_path)  # the rebuilt entry is sound again
    assert status == "hit" and sha256_file(roles["file"]) == read_manifest(again)["files"]["backbone.onnx"]["sha256"]
    off = read_manifest(build_multi_engine([tmp_path / "bike.pt", ck["taxi"]], tmp_path / "nocache.engine",
                                           max_batch=MAX_BATCH, use_cache=False, progress=False))
    assert off["backends"]["onnxruntime"]["cache"] == "off"
    assert {e["backends"]["onnxruntime"]["parity"]["cache"] for e in off["models"].values()} == {"off"}


# ----------------------------------------------------------------------------- CLI
def test_precision_auto_on_a_multi_model_build_and_flags_that_do_not_apply(world, tmp_path, capsys):
    """build a.pt b.pt --precision auto: every built backend that serves many models is timed and the fastest
    is the default Engine.load opens; build flags that a kind of build cannot honour are one-line refusals."""
    ck = world["ckpts"]
    out = tmp_path / "auto.engine"
    assert main(["build", str(ck["bike"]), str(ck["taxi"]), "-o", str(out), "--precision", "auto", "--threads", "1",
                 "--max-batch", str(MAX_BATCH), "--cache-dir", str(world["cache"]), "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = read_manifest(out)
    assert report["default"] == m["default"] and m["default"]["precision"] == "fp32"
    assert m["default"]["backend"] in m["backends"] and m["auto"]["threads"] == 1
    assert {r["backend"] for r in m["auto"]["candidates"]} == set(m["backends"])
    assert all(r["p50_ms"] > 0 for r in m["auto"]["candidates"])
    engine = Engine.load(out)
    assert engine.backend == m["default"]["backend"]
    x, tod, dow = inputs_for(world, "bike", 2, np.random.default_rng(4))
    assert rel_err(engine.predict(x, tod, dow, model="bike"), reference_output(world["refs"]["bike"], x, tod, dow)) <= TOL
    for argv, expected in (([str(ck["bike"]), str(ck["taxi"]), "--max-mae-loss", "0.02"], "give --calib-data"),
                           ([str(ck["bike"]), "--no-cache"], "the build cache serves multi-model builds")):
        assert main(["build", *argv, "-o", str(tmp_path / "x.engine")]) == 2
        assert expected in one_error_line(capsys.readouterr().err, "build")
    assert not (tmp_path / "x.engine").exists()


def test_cli_init_build_run_inspect_bench(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ck = world["ckpts"]
    assert main(["init", "--backbone-layers", "1", "--height", "10", "--width", "6", "--channels", "3",
                 "--history", "6", "--horizon", "3", "--steps-per-day", "0", "--adapter-dim", "8", "--prompts", "2",
                 "--heads", "3", "--seed", "2", "--backbone-weights", str(ck["bike"]), "-o", str(tmp_path / "t.pt")]) == 0
    made, bike = load_model(tmp_path / "t.pt"), world["refs"]["bike"]
    assert all(torch.equal(v, bike.backbone.state_dict()[k]) for k, v in made.backbone.state_dict().items())
    capsys.readouterr()
    out = tmp_path / "cli.engine"
    assert main(["build", str(ck["bike"]), str(tmp_path / "t.pt"), "-o", str(out), "--names", "bike,taxi", "-q",
                 "--max-batch", str(MAX_BATCH)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["models"]) == {"bike", "taxi"} and report["backends"]["onnxruntime"]["cache"] == "miss"
    assert (tmp_path / "xdg" / "stvfm-engine").is_dir()
    x, _, _ = inputs_for(world, "taxi", 2, np.random.default_rng(2))
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(out), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "y.npz"),
                 "--model", "taxi"]) == 0
    assert rel_err(np.load(tmp_path / "y.npz")["y"], reference_output(made, x, None, None)) <= TOL
    capsys.readouterr()
    assert main(["run", str(out), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "z.npz")]) == 2
    assert "pass model=NAME" in one_error_line(capsys.readouterr().err, "run")
    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "2 models on one backbone" in text and "all 8 files match" in text
    assert main(["bench", str(out), "--backends", "eager"]) == 2
    assert "bench it with --mix" in one_error_line(capsys.readouterr().err, "bench")
    # singles matched by checkpoint sha256: nothing is built; eager keeps it short
    assert main(["bench", str(world["multi"]), str(world["singles"]["bike"]), str(world["singles"]["taxi"]),
                 "--mix", "bike:3,taxi:2", "--backends", "eager", "--iters", "2", "--warmup", "0", "--quiet",
                 "--json", str(tmp_path / "mix.json")]) == 0
    mix = json.loads((tmp_path / "mix.json").read_text())
    rows = {r["variant"]: r for r in mix["results"]}
    assert mix["mix"] == {"bike": 3, "taxi": 2} and mix["sequence_lengths"] == {"bike": 29, "taxi": 16}
    assert rows["mixed"]["backbone_calls_per_mixed_batch"] == 2
    assert rows["separate"]["backbone_calls_per_mixed_batch"] == 5
    assert rows["separate_batched"]["backbone_calls_per_mixed_batch"] == 2
    assert rows["agreement"]["max_rel_err_mixed_vs_separate"] <= TOL
    memory = mix["memory"][0]
    assert set(memory["singles_rss_added_mb"]) == {"bike", "taxi"} and memory["multi_rss_added_mb"] > 0


def test_parts_export_falls_back_to_the_dynamo_exporter(world, tmp_path, monkeypatch):
    """The parts go through the TorchScript exporter first; where it fails, the dynamo exporter writes them,
    and either way the graphs reproduce the reference's stages."""
    import onnxruntime as ort

    from stvfm_engine.engine.graph import PostGraph, PreGraph, input_names
    from stvfm_engine.export import onnx_export
    from stvfm_engine.errors import ExportError

    model = world["refs"]["taxi"]
    used = []
    real_ts, real_dynamo = onnx_export.export_torchscript, onnx_export.export_graph
    for failing in (False, True):
        def torchscript(*a, **k):
            used.append("torchscript")
            if failing:
                raise ExportError("TorchScript ONNX export failed: simulated")
            return real_ts(*a, **k)
        monkeypatch.setattr(onnx_export, "export_torchscript", torchscript)
        monkeypatch.setattr(onnx_export, "export_graph", lambda *a, **k: used.append("dynamo") or real_dynamo(*a, **k))
        pre, post = onnx_export.export_parts(model, tmp_path / f"pre{failing}.onnx", tmp_path / f"post{failing}.onnx", 4)
        x = inputs_for(world, "taxi", 3, np.random.default_rng(2))[0]
        with torch.no_grad():
            tokens = PreGraph(model)(torch.from_numpy(x))
            y = PostGraph(model)(model.backbone.encode(tokens))
        got = ort.InferenceSession(str(pre)).run(None, dict(zip(input_names(model.config), [x])))[0]
        assert rel_err(got, tokens.numpy()) <= TOL
        h = model.backbone.encode(tokens).detach().numpy()
        assert rel_err(ort.InferenceSession(str(post)).run(None, {"h": h})[0], y.numpy()) <= TOL
    assert used == ["torchscript", "torchscript", "torchscript", "dynamo", "torchscript", "dynamo"]


def test_parts_export_of_a_grid_the_patch_does_not_divide(tmp_path):
    """13x7 at p=2 (padded): the TorchScript trace of ``pre`` bakes a shape in (torch 2.14); the export
    notices at other batches and writes the graph with the dynamo exporter. Either way: right at any batch."""
    import onnxruntime as ort

    from stvfm_engine.engine.graph import PostGraph, PreGraph, example_inputs, input_names
    from stvfm_engine.export.onnx_export import export_parts

    config = CONFIGS["vit-tiny-c3-13x7-p2-T5-H2-day24"]
    model = load_model(write_checkpoint(tmp_path / "odd.pt", config, seed=3))
    pre, post = export_parts(model, tmp_path / "pre.onnx", tmp_path / "post.onnx", 8)
    for batch in (1, 5, 8):
        args = example_inputs(model, batch=batch)
        with torch.no_grad():
            tokens = PreGraph(model)(*args)
            h = model.backbone.encode(tokens)
            y = PostGraph(model)(h)
        got = ort.InferenceSession(str(pre)).run(None, {n: a.numpy() for n, a in zip(input_names(config), args)})[0]
        assert rel_err(got, tokens.numpy()) <= TOL, batch
        assert rel_err(ort.InferenceSession(str(post)).run(None, {"h": h.numpy()})[0], y.numpy()) <= TOL, batch
