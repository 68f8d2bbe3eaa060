"""Mixed traffic through a multi-model engine (``bench DIR --mix bike:8,taxi:8``): ``predict_many`` on one
shuffled list of requests for several models against the same requests through separate single-model
engines, the backbone calls per mixed batch, and the resident memory each adds (fresh processes)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from stvfm_engine.bench import memory, report
from stvfm_engine.bench.runner import BenchError, make_inputs, torch_threads
from stvfm_engine.engine.timing import Schedule, summarize, time_interleaved
from stvfm_engine.engine import Engine
from stvfm_engine.engine.manifest import is_multi, read_manifest
from stvfm_engine.engine.reference import reference_models
from stvfm_engine.engine.registry import BACKENDS, names
from stvfm_engine.export.parity import relative_error
from stvfm_engine.model.checkpoint import save_checkpoint


def parse_mix(text: str, models: Sequence[str]) -> dict[str, int]:
    """``"bike:8,taxi:8"`` -> ``{"bike": 8, "taxi": 8}`` (requests per model), checked against ``models``."""
    mix: dict[str, int] = {}
    for item in (t.strip() for t in str(text).split(",")):
        name, _, count = item.rpartition(":")
        if not name or not count.isdigit() or int(count) < 1 or name in mix:
            raise BenchError(f"expected --mix NAME:COUNT[,NAME:COUNT...] with counts >= 1 and each name once, got {text!r}")
        if name not in models:
            raise BenchError(f"--mix names {name!r}; the engine serves {list(models)}")
        mix[name] = int(count)
    return mix


def mix_requests(engine: Engine, mix: dict[str, int], batch: int, seed: int = 0) -> list[tuple]:
    """``(model, x, tod, dow)`` requests of ``batch`` samples, ``mix[model]`` of each, shuffled (seeded)."""
    requests = [(name, *make_inputs(engine.models[name], batch, seed=seed + i))
                for name, count in mix.items() for i in range(count)]
    order = np.random.default_rng(seed).permutation(len(requests))
    return [requests[i] for i in order]


@contextlib.contextmanager
def single_engines(multi_dir: Path, singles: Sequence[str | os.PathLike], models: Sequence[str], backend: str,
                   log: Callable[[str], None]) -> Iterator[dict[str, Path]]:
    """A one-model engine directory per model of ``multi_dir``: one of ``singles`` built from the same
    checkpoint (matched by its sha256), else built into a temporary directory from the multi-model one."""
    manifest = read_manifest(multi_dir)
    by_sha = {}
    for d in singles:
        m = read_manifest(d)
        if is_multi(m):
            raise BenchError(f"{d} is a multi-model engine; expected one-model engines to compare with")
        by_sha[m["checkpoint"]["sha256"]] = Path(d)
    found = {n: by_sha.get(manifest["models"][n]["checkpoint"]["sha256"]) for n in models}
    with tempfile.TemporaryDirectory(prefix="stvfm-mix-") as tmp:
        missing = [n for n, d in found.items() if d is None]
        if missing:
            from stvfm_engine.export.build import build_engine

            artifact = backend if BACKENDS[backend].artifact else names(artifact=True, multi_model=True)[0]
            for name, model in reference_models(multi_dir, manifest, names=missing).items():
                log(f"building a one-model {artifact} engine of {name} to compare with (pass it to skip this)")
                save_checkpoint(model, Path(tmp) / f"{name}.pt")
                found[name] = build_engine(Path(tmp) / f"{name}.pt", Path(tmp) / name, backends=[artifact],
                                           max_batch=manifest["max_batch"], progress=False)
        yield found


def run_mix(multi_dir: str | os.PathLike, mix_text: str, singles: Sequence[str | os.PathLike] = (),
            backends: Sequence[str] = ("onnxruntime",), batch: int = 1, schedule: Schedule = Schedule(),
            threads: Optional[int] = None, measure_memory: bool = True, command: Optional[Sequence[str]] = None,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Time the mixed list through ``predict_many`` against separate one-model engines, per backend.

    Variants, interleaved in blocks: ``mixed`` (one ``predict_many`` call), ``separate`` (one ``predict``
    per request on its model's engine) and ``separate_batched`` (each engine gets its model's requests
    in calls of at most max_batch samples, as a server that batches per model would).
    """
    multi_dir = Path(multi_dir)
    manifest = read_manifest(multi_dir)
    if not is_multi(manifest):
        raise BenchError(f"{multi_dir} is a one-model engine; --mix needs a multi-model engine "
                         "(stvfm-engine build a.pt b.pt -o DIR)")
    if bad := [b for b in backends if b not in names(multi_model=True)]:
        raise BenchError(f"--mix times backends that serve multi-model engines ({list(names(multi_model=True))}), "
                         f"not {bad}")
    models = list(manifest["models"])
    mix = parse_mix(mix_text, models)
    head = report.header("cpu", command)
    rows, memory_rows = [], []
    with single_engines(multi_dir, singles, list(mix), backends[0], log) as single_dirs, torch_threads(threads):
        for b in backends:
            engine = Engine.load(multi_dir, backend=b, threads=threads)
            alone = {n: Engine.load(d, backend=b, threads=threads) for n, d in single_dirs.items()}
            requests = mix_requests(engine, mix, batch)
            by_model = {n: [(None, *r[1:]) for r in requests if r[0] == n] for n in mix}  # None: the engine's one model
            calls = {"mixed": lambda: engine.predict_many(requests),
                     "separate": lambda: [alone[r[0]].predict(*r[1:]) for r in requests],
                     "separate_batched": lambda: [alone[n].predict_many(rs) for n, rs in by_model.items() if rs]}
            counts = {k: _backbone_calls([engine, *alone.values()], fn) for k, fn in calls.items()}
            mixed, separate = engine.predict_many(requests), [alone[r[0]].predict(*r[1:]) for r in requests]
            agreement = max(relative_error(y, ref) for y, ref in zip(mixed, separate))
            log(f"timing {b}: {', '.join(calls)} ({len(requests)} requests of batch {batch})")
            samples = time_interleaved(calls, schedule)
            for variant, s in samples.items():
                st = summarize(s, batch * len(requests))
                rows.append({"backend": b, "variant": variant, "p50_ms": st["p50_ms"], "p90_ms": st["p90_ms"],
                             "mean_ms": st["mean_ms"], "samples_per_s": st["throughput"],
                             "requests_per_s": st["throughput"] / batch, "backbone_calls_per_mixed_batch": counts[variant],
                             "samples": st["samples"]})
            mixed_p50 = next(r["p50_ms"] for r in rows if r["backend"] == b and r["variant"] == "mixed")
            for r in rows:
                if r["backend"] == b:
                    r["mixed_speedup"] = r["p50_ms"] / mixed_p50  # > 1: predict_many is faster than this variant
            rows.append({"backend": b, "variant": "agreement", "max_rel_err_mixed_vs_separate": agreement})
            if measure_memory:
                memory_rows.append(_memory(multi_dir, single_dirs, b, threads, log))
    return {**head, "engine": str(multi_dir), "mix": mix, "batch_per_request": batch, "requests": sum(mix.values()),
            "sequence_lengths": {n: manifest["models"][n]["sequence_length"] for n in mix},
            "threads": threads, "schedule": {"warmup": schedule.warmup, "rounds": schedule.rounds,
                                             "block": schedule.block, "drop": schedule.drop,
                                             "method": "variants interleaved in blocks, first calls of each block "
                                                       "dropped, block order rotated each round"},
            "results": rows, "memory": memory_rows, "memory_note": memory.ADDED_NOTE}


def _backbone_calls(engines: Sequence[Engine], fn: Callable[[], object]) -> int:
    before = sum(e.backbone_calls for e in engines)
    fn()
    return sum(e.backbone_calls for e in engines) - before


def _memory(multi_dir: Path, single_dirs: dict[str, Path], backend: str, threads: Optional[int],
            log: Callable[[str], None]) -> dict:
    log(f"resident memory added ({backend}): the multi-model engine and {len(single_dirs)} one-model engines, "
        "each in a fresh process")
    multi = memory.added(multi_dir, backend, threads)["rss_added_mb"]
    singles = {n: memory.added(d, backend, threads)["rss_added_mb"] for n, d in single_dirs.items()}
    return {"backend": backend, "multi_rss_added_mb": multi, "singles_rss_added_mb": singles,
            "singles_sum_mb": sum(singles.values()), "multi_vs_singles": multi / max(sum(singles.values()), 1e-9)}


def format_mix(result: dict) -> str:
    """The mixed-traffic table, then the memory rows."""
    lines = [f"{result['requests']} requests ({', '.join(f'{n}:{c}' for n, c in result['mix'].items())}), batch "
             f"{result['batch_per_request']} each; sequence lengths {result['sequence_lengths']}"]
    head = f"{'backend':<12} {'variant':<17} {'p50 ms':>9} {'requests/s':>11} {'mixed x':>8} {'backbone calls':>15}"
    lines += [head, "-" * len(head)]
    for r in result["results"]:
        if r["variant"] == "agreement":
            lines.append(f"{r['backend']:<12} mixed vs separate outputs: max relative error "
                         f"{r['max_rel_err_mixed_vs_separate']:.2e}")
            continue
        lines.append(f"{r['backend']:<12} {r['variant']:<17} {r['p50_ms']:>9.2f} {r['requests_per_s']:>11.1f} "
                     f"{r['mixed_speedup']:>8.2f} {r['backbone_calls_per_mixed_batch']:>15}")
    for m in result["memory"]:
        lines.append(f"{m['backend']}: RSS added by load + one predict per model: multi-model {m['multi_rss_added_mb']:.0f} MB, "
                     f"one-model engines {m['singles_sum_mb']:.0f} MB in all ({100 * m['multi_vs_singles']:.0f}%)")
    return "\n".join(lines)
