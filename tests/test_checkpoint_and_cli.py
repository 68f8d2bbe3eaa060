"""Checkpoints (plain data, weights_only), the init/train/eval CLI, data windows, training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from stvfm_engine import load_model, save_checkpoint
from stvfm_engine.cli import main
from stvfm_engine.errors import CheckpointError
from stvfm_engine.model.data import Windows, flow_data_from_array, load_flow_data, synthetic_flow
from stvfm_engine.model.stvfm import build_model
from stvfm_engine.model.train import train
from helpers import CONFIGS

SMALL = CONFIGS["vit-tiny-c2-6x5-p2-T4-H2-day48"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stvfm_engine", *args], capture_output=True, text=True, timeout=600)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact(tmp_path):
    m = build_model(SMALL, seed=4)
    m.set_normalization([3.0, 4.0], [2.0, 0.5])
    path = save_checkpoint(m, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1 and raw["config"]["calendar"] is None and "start_dow" not in raw["config"]
    assert raw["normalization"] == {"mean": [3.0, 4.0], "std": [2.0, 0.5]}
    m2 = load_model(path)
    assert not m2.training and m2.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    for name, p in m2.named_parameters():
        assert p.requires_grad == (not name.startswith("backbone.")) and p.dtype == torch.float32
    x = torch.rand(3, 4, 2, 6, 5) * 9
    tod, dow = torch.randint(0, 48, (3, 4)), torch.randint(0, 7, (3, 4))
    with torch.inference_mode():
        assert torch.equal(m(x, tod, dow), m2(x, tod, dow))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    ckpt = build_model(SMALL, seed=0)
    from stvfm_engine.model.checkpoint import checkpoint_dict

    d = checkpoint_dict(ckpt)
    d["metrics"] = {"x": _Payload(marker)}
    torch.save(d, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()
    r = run_cli("eval", str(path), "--data", str(tmp_path / "none"))
    assert r.returncode == 2 and not marker.exists()


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(format_version=99), "format_version"),
    (lambda d: d["state_dict"].update({"head.weight": torch.zeros(3, 3)}), "shape mismatch for head.weight"),
    (lambda d: d["state_dict"].pop("bcpc.fuse.bias"), "missing"),
    (lambda d: d["config"].update(patch=0), "patch must be"),
    (lambda d: d.pop("normalization"), "normalization"),
    (lambda d: d["state_dict"].update({"head.bias": torch.zeros(16, dtype=torch.int64)}), "dtype mismatch for head.bias"),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, mutate, match):
    from stvfm_engine.model.checkpoint import checkpoint_dict

    d = checkpoint_dict(build_model(SMALL, seed=0))
    mutate(d)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(tmp_path / "bad.pt")
    assert "\n" not in str(e.value)


def test_truncated_random_and_missing_files(tmp_path):
    good = save_checkpoint(build_model(SMALL, seed=0), tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "notes.txt").write_text("bike model, trained 2026-11-01\n")
    with pytest.raises(CheckpointError, match="notes.txt: not a checkpoint: expected a file written by "
                                              r"'stvfm-engine init' or 'train' \(a torch.save zip archive\), "
                                              "found a text file"):
        load_model(tmp_path / "notes.txt")
    for name in ("trunc.pt", "random.pt", "missing.pt", "notes.txt"):
        with pytest.raises(CheckpointError):
            load_model(tmp_path / name)
        r = run_cli("eval", str(tmp_path / name), "--data", "x")
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- CLI
def test_init_odd_configuration_gives_the_right_output_shape(tmp_path):
    out = tmp_path / "odd.pt"
    assert main(["init", "--backbone", "deit_tiny_distilled_patch16_224", "--backbone-layers", "1",
                 "--height", "11", "--width", "7", "--channels", "3", "--patch", "4", "--history", "5",
                 "--horizon", "4", "--prompts", "5", "--heads", "4", "--adapter-dim", "12",
                 "--steps-per-day", "0", "--seed", "3", "-o", str(out)]) == 0
    m = load_model(out)
    assert m.config.heads == 4 and m.config.steps_per_day == 0
    with torch.inference_mode():
        y = m(torch.rand(2, 5, 3, 11, 7))
    assert y.shape == (2, 4, 3, 11, 7)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    cases = (["init", "--backbone", "resnet18", "-o", str(tmp_path / "a.pt")],
             ["init", "--heads", "5", "-o", str(tmp_path / "b.pt")],
             ["init", "--backbone", "no_such_model_xyz", "-o", str(tmp_path / "c.pt")],
             ["train", "--preset", "tiny", "--data", str(tmp_path / "nothing"), "-o", str(tmp_path / "d.pt")],
             ["init", "--preset", "tiny"],  # usage errors (argparse) are one line too
             ["build", "--max-batch", "0", str(tmp_path / "a.pt"), "-o", str(tmp_path / "e")],
             ["no-such-command"])
    with ThreadPoolExecutor(2) as pool:  # independent processes, mostly interpreter start-up: two at a time
        results = list(pool.map(lambda args: run_cli(*args), cases))
    for args, r in zip(cases, results):
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())
    r = run_cli("--debug", "init", "--heads", "5", "-o", str(tmp_path / "b.pt"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_learning_rate_and_npy_data_are_one_line_errors(tmp_path):
    r = run_cli("train", "--preset", "tiny", "--data", "x", "--lr", "-1", "-o", str(tmp_path / "a.pt"))
    assert r.returncode == 2 and "learning rate" in r.stderr
    for name in ("train", "val", "test"):
        np.save(tmp_path / f"d_{name}.npz.npy", np.ones((30, 4, 3, 2)))
        (tmp_path / f"d_{name}.npz.npy").rename(tmp_path / f"d_{name}.npz")
    from stvfm_engine.errors import DataError

    with pytest.raises(DataError, match="single .npy array"):
        load_flow_data(tmp_path / "d")
    assert not (tmp_path / "a.pt").exists()


def test_help_teaches():
    r = run_cli("--help")
    assert r.returncode == 0 and "init" in r.stdout and "train" in r.stdout and "build" in r.stdout
    r = run_cli("train", "--help")
    assert "--backbone-weights" in r.stdout and "PREFIX_train.npz" in r.stdout


# ----------------------------------------------------------------------------- data
def test_windows_and_time_features_run_on_across_splits(tmp_path):
    rng = np.random.default_rng(1)
    sizes = {"train": 100, "val": 30, "test": 40}
    full = rng.random((sum(sizes.values()), 4, 3, 2)) * 10
    s = 0
    for name, n in sizes.items():
        np.savez(tmp_path / f"d_{name}.npz", flow=full[s:s + n])
        s += n
    data = load_flow_data(tmp_path / "d")
    assert data.channels == 2 and data.grid == (4, 3)
    w = Windows(data.splits["test"], history=5, horizon=2, steps_per_day=48, start_dow=2)
    assert len(w) == 40 - 5 - 2 + 1
    x, y, tod, dow = w.batch(np.array([0, 7]))
    np.testing.assert_allclose(x[1], full[130 + 7:130 + 12].transpose(0, 3, 1, 2), rtol=1e-6)
    np.testing.assert_allclose(y[0], full[135:137].transpose(0, 3, 1, 2), rtol=1e-6)
    steps = 130 + np.arange(5)
    np.testing.assert_array_equal(tod[0], steps % 48)
    np.testing.assert_array_equal(dow[0], (2 + steps // 48) % 7)
    mean, std = data.normalization()
    np.testing.assert_allclose(mean, full[:100].mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, full[:100].std(axis=(0, 1, 2)), rtol=1e-5)


def test_training_changes_trainables_and_never_the_backbone():
    config = SMALL.replace(height=14, width=8)
    data = flow_data_from_array(synthetic_flow(steps=48 * 4, height=14, width=8), fractions=(0.6, 0.2))
    m = build_model(config, seed=0)
    m.set_normalization(*data.normalization())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, data, max_steps=3, batch_size=4, eval_every=1, progress=False)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen = {k for k in before if k.startswith("backbone.")}
    assert frozen and not (changed & frozen)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and trainable <= changed | {"adapter_r.tod_embed", "adapter_f.tod_embed",
                                                 "adapter_r.dow_embed", "adapter_f.dow_embed"}


def test_training_is_deterministic_for_a_seed():
    config = SMALL.replace(height=14, width=8)
    data = flow_data_from_array(synthetic_flow(steps=48 * 4, height=14, width=8), fractions=(0.6, 0.2))
    states = []
    for _ in range(2):
        m = build_model(config, seed=0)
        train(m, data, max_steps=2, batch_size=4, eval_every=2, progress=False, seed=5)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_tiny_trained_on_nybike_beats_baselines(nyc_data, tmp_path):
    """tiny on NYBike for a few hundred steps via the CLI: frozen tensors bit-identical, test RMSE
    below persistence and historical average."""
    init = tmp_path / "tiny.pt"
    out = tmp_path / "bike.pt"
    assert main(["init", "--preset", "tiny", "-o", str(init)]) == 0
    prefix = str(nyc_data / "NYBike_flow")
    assert main(["train", "--init", str(init), "--data", prefix, "--max-steps", "250", "--quiet", "-o", str(out)]) == 0
    a, b = load_model(init).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))
    assert not torch.equal(a["head.weight"], b["head.weight"])
    r = run_cli("eval", str(out), "--data", prefix, "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert set(metrics) == {"model", "persistence", "historical_average"}
    assert metrics["model"]["rmse"] < metrics["persistence"]["rmse"]
    assert metrics["model"]["rmse"] < metrics["historical_average"]["rmse"]


def test_demo_runs_offline_end_to_end(tmp_path, capsys):
    """The embedded default: synthetic data, training, baselines, an engine build and the latency line."""
    assert main(["demo", "--max-steps", "4", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "persistence" in out and "historical_average" in out
    assert "engine (onnxruntime)" in out and "rel. error vs eager" in out
    assert (tmp_path / "demo.pt").is_file() and (tmp_path / "demo.engine" / "manifest.json").is_file()
