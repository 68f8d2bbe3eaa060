"""The embedded default: the whole flow offline, on synthetic data (no GPU, network or data files).

checkpoint -> model -> export -> engine: synthesise a periodic city-flow grid, train the ``tiny``
preset, compare with the baselines, build an engine and compare eager vs engine latency.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def run_demo(max_steps: int = 400, workdir: Optional[str] = None, build: bool = True,
             backends: Sequence[str] = ("onnxruntime",)) -> dict:
    from stvfm_engine.model.checkpoint import save_checkpoint
    from stvfm_engine.model.config import from_preset
    from stvfm_engine.model.data import flow_data_from_array, synthetic_flow, windows_for
    from stvfm_engine.model.stvfm import build_model
    from stvfm_engine.model.train import split_metrics, train

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="stvfm-demo-")
        workdir = tmp.name
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        log("demo: synthesising 35 days of 30-minute city flows on a 14x8 grid, 2 channels")
        data = flow_data_from_array(synthetic_flow(), source="synthetic")
        config = from_preset("tiny", channels=data.channels, height=data.grid[0], width=data.grid[1])
        model = build_model(config, seed=0)
        model.set_normalization(*data.normalization())
        log(f"demo: training tiny ({config.backbone}, {config.backbone_layers} blocks, frozen) for {max_steps} steps")
        result = train(model, data, max_steps=max_steps, batch_size=32, eval_every=max(1, max_steps // 4))
        metrics = split_metrics(model, data)
        print(f"test split of the synthetic data, raw units ({max_steps} steps, {result.seconds:.0f} s):")
        print(f"  {'forecaster':<20} {'MAE':>9} {'RMSE':>9}")
        for name, m in metrics.items():
            print(f"  {name:<20} {m['mae']:>9.3f} {m['rmse']:>9.3f}")
        ckpt = save_checkpoint(model, work / "demo.pt", metrics={"test": metrics})
        out = {"metrics": metrics, "checkpoint": str(ckpt)}
        if not build:
            return out

        from stvfm_engine.engine import Engine
        from stvfm_engine.export.build import build_engine

        from stvfm_engine.engine.timing import Schedule, time_interleaved

        # a temporary workdir is gone when the demo ends: its build does not announce a path to keep
        engine_dir = build_engine(ckpt, work / "demo.engine", backends=backends, progress=tmp is None)
        engine = Engine.load(engine_dir)
        eager = Engine.load(engine_dir, backend="eager")
        x, _, tod, dow = windows_for(model, data, "test").batch(np.array([0]))
        y_engine, y_eager = engine.predict(x, tod, dow), eager.predict(x, tod, dow)
        err = float(np.linalg.norm(y_engine - y_eager) / np.linalg.norm(y_eager))
        schedule = Schedule(warmup=5, rounds=6, block=10, drop=3)
        ms = time_interleaved({"eager": lambda: eager.predict(x, tod, dow),
                               engine.backend: lambda: engine.predict(x, tod, dow)}, schedule)
        eager_ms, engine_ms = statistics.median(ms["eager"]), statistics.median(ms[engine.backend])
        print(f"latency, batch 1, {torch.get_num_threads()} threads (medians, {schedule.kept_per_variant} calls each, "
              f"interleaved in blocks, {schedule.cooldown_s:g} s pause before each):")
        print(f"  eager PyTorch          {eager_ms:8.3f} ms")
        print(f"  engine ({engine.backend}) {engine_ms:8.3f} ms   {eager_ms / engine_ms:.2f}x faster, "
              f"rel. error vs eager {err:.1e}")
        out.update(engine=str(engine_dir), backend=engine.backend, eager_ms=eager_ms, engine_ms=engine_ms,
                   rel_error=err)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()
            log("demo: the checkpoint and engine were built in a temporary folder, now removed "
                "(--workdir DIR keeps them)")
        else:
            log(f"demo: checkpoint and engine kept in {work}")

