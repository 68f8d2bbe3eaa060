"""The child processes of :mod:`stvfm_engine.bench.gpu_check`: one task each, so that a crash or a hang
costs one variant or one phase, never the run.

    python -m stvfm_engine.bench.gpu_tasks TASK SPEC.json OUT.json

``TASK`` is one of :data:`TASKS`. A task reads its spec (JSON, written by the parent) and writes its
result to ``OUT.json`` atomically, again after every step worth keeping if it is stopped (a batch
timed, a variant opened), so the parent can read what was done after it killed the task. An error
of one variant is recorded in the result (``errors``) and the task goes on; an error that ends the
task is written as ``error`` and the exit status is 1.

Timing (:func:`time_calls`): the variants at one batch size are interleaved in blocks, block order
rotated each round, no pause between blocks (a GPU left idle drops its clock), every call through
:func:`~stvfm_engine.bench.runner.open_variant`'s session path (input check included) and timed end
to end with CUDA events on a GPU (``time.perf_counter`` on a CPU); every variant is warmed up at that
batch size before the first timed block, so nothing compiles while something is timed.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from stvfm_engine.bench import report, roofline
from stvfm_engine.bench.runner import make_inputs, open_variant
from stvfm_engine.engine.timing import summarize
from stvfm_engine.errors import first_line

NVIDIA_SMI_FIELDS = ("name", "driver_version", "pstate", "temperature.gpu", "clocks.sm", "clocks.mem",
                     "clocks.max.sm", "power.draw", "utilization.gpu")
FUSED_STAGES = {"normalise+flow": "flow_patchify", "token adapter": "token_adapter",
                "bcpc": "prompt_condition + bilateral_attention"}  # stage -> the fused op(s) that run it


# ----------------------------------------------------------------------------- small helpers
def gpu_state() -> dict:
    """Clocks, temperature, power and utilisation of GPU 0 from ``nvidia-smi`` (``error`` where it is absent)."""
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi failed: {first_line(e)}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"error": f"nvidia-smi exited {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}"}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return {"time": time.strftime("%H:%M:%S"), **dict(zip(NVIDIA_SMI_FIELDS, values))}


def write_result(path: Path, data: dict) -> None:
    report.write_json(data, path)


def variant_name(backend: str, precision: str) -> str:
    return f"{backend}/{precision}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- engines
def prepare_engine(preset: str, work: Path, max_batch: int, device: str) -> Path:
    """A checkpoint of ``preset`` with random weights (seed 0, a non-trivial normalisation) and a weights-only
    engine directory of it (manifest + weights: the weights backends eager/triton/compile open it)."""
    from stvfm_engine.engine.manifest import FORMAT_VERSION, WEIGHTS_NAME, file_record, file_table, write_manifest
    from stvfm_engine.engine.precision import get_precision
    from stvfm_engine.export.atomic_dir import atomic_directory
    from stvfm_engine.export.build import save_weights
    from stvfm_engine.export.records import manifest_head, model_record
    from stvfm_engine.model.checkpoint import save_checkpoint
    from stvfm_engine.model.config import from_preset
    from stvfm_engine.model.stvfm import build_model

    model = build_model(from_preset(preset), seed=0)
    g = torch.Generator().manual_seed(0)
    model.set_normalization(torch.rand(model.config.channels, generator=g) * 20,
                            torch.rand(model.config.channels, generator=g) * 10 + 1)
    ckpt = save_checkpoint(model, work / f"{preset}.pt")
    out = work / f"{preset}.engine"
    with atomic_directory(out) as tmp:
        save_weights(model.state_dict(), tmp / WEIGHTS_NAME)
        manifest = {**manifest_head(FORMAT_VERSION, get_precision("fp32"), device, max_batch),
                    **model_record(model, {"file": ckpt.name, **file_record(ckpt)}, max_batch),
                    "files": file_table(tmp), "backends": {}}
        write_manifest(tmp, manifest)
    return out


def engine_for(variant: dict, spec: dict) -> Path:
    """The engine directory a variant opens: the weights-only one, or (``build``) its own artifact built
    from the checkpoint beside it (AOTInductor, TensorRT: the compile happens here, in this process)."""
    work, preset = Path(spec["work"]), spec["preset"]
    if not variant.get("build"):
        return work / f"{preset}.engine"
    from stvfm_engine.export.build import build_engine

    out = work / f"{preset}-{variant['backend']}-{variant['precision']}.engine"
    return build_engine(work / f"{preset}.pt", out, backends=[variant["backend"]], precision=variant["precision"],
                        device=spec["device"], max_batch=spec["max_batch"], progress=False)


def parity_of(predict: Callable, reference: Callable, config, batches: list[int]) -> dict:
    """``||y - y_fp32|| / ||y_fp32||`` per batch size against the fp32 eager reference, on fresh inputs."""
    from stvfm_engine.export.parity import relative_error

    errs = {}
    for b in batches:
        x, tod, dow = make_inputs(config, b, seed=100 + b)
        errs[str(b)] = relative_error(predict(x, tod, dow), reference(x, tod, dow))
    return {"per_batch": errs, "max_rel_err": max(errs.values())}


# ----------------------------------------------------------------------------- timing
def time_calls(calls: dict[str, Callable[[], object]], schedule: dict, cuda: bool) -> dict[str, list[float]]:
    """Kept latencies (ms) of every callable, interleaved in blocks with no pause between blocks.

    ``schedule``: ``warmup`` untimed calls per variant, then ``rounds`` rounds of ``block`` calls per
    variant (order rotated each round), the first ``drop`` of each block discarded. On CUDA each call
    sits between two CUDA events on the current stream (a call returns host arrays: it is timed end to
    end); the events are read once, after the last block.
    """
    names = list(calls)
    for name in names:
        for _ in range(schedule["warmup"]):
            calls[name]()
    if cuda:
        torch.cuda.synchronize()
    marks: dict[str, list] = {n: [] for n in names}
    for r in range(schedule["rounds"]):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = calls[name]
            for i in range(schedule["block"]):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    mark = (start, end)
                else:
                    t0 = time.perf_counter()
                    fn()
                    mark = (time.perf_counter() - t0) * 1e3
                if i >= schedule["drop"]:
                    marks[name].append(mark)
    if cuda:
        torch.cuda.synchronize()
        return {n: [s.elapsed_time(e) for s, e in m] for n, m in marks.items()}
    return marks


class _Failed(Exception):
    def __init__(self, name: str, error: BaseException):
        super().__init__(f"{name}: {type(error).__name__}: {first_line(error)}")
        self.name = name


def _tagged(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        try:
            return fn()
        except Exception as e:
            raise _Failed(name, e) from e
    return call


def time_batches(variants: dict, config, plan: list, spec: dict, out: dict, save: Callable[[], None],
                 command: list[str]) -> None:
    """Time ``variants`` (name -> Variant) at each ``[batch, [names]]`` of ``plan``; fills ``out["report"]``
    (the ``stvfm-engine bench --json`` layout), ``out["done_batches"]``, ``out["gpu_state"]`` and
    ``out["errors"]``, calling ``save()`` after each batch. A variant that fails is dropped, the batch retried."""
    device, cuda = spec["device"], spec["device"].startswith("cuda")
    head = report.header(device, command)
    shape = roofline.backbone_shape(config)
    rep = out["report"] = {**head, "config": config.to_dict(), "threads": torch.get_num_threads(),
                           "schedule": {**spec["schedule"], "cooldown_s": 0,
                                        "timer": "cuda_events" if cuda else "perf_counter",
                                        "method": "variants interleaved in blocks per batch size, no pause between "
                                                  "blocks, block order rotated each round, first calls of each block "
                                                  "dropped; every call end to end through the session path"},
                           "memory_note": "peak memory not measured", "results": [], "stages": [], "roofline": [],
                           "stage_costs": {}}
    for batch, names in plan:
        x, tod, dow = make_inputs(config, batch)
        live = [n for n in names if n in variants]
        samples = None
        while live:
            calls = {n: _tagged(n, lambda v=variants[n]: v.predict(x, tod, dow)) for n in live}
            before = gpu_state() if cuda else None
            try:
                samples = time_calls(calls, spec["schedule"], cuda)
                break
            except _Failed as e:
                out["errors"].append({"variant": e.name, "message": f"batch {batch}: {e}"})
                live.remove(e.name)
                variants.pop(e.name, None)
                _sync(device)
        if not samples:
            continue
        out["gpu_state"][str(batch)] = {"before": before, "after": gpu_state() if cuda else None}
        stats = {n: summarize(s, batch) for n, s in samples.items()}
        eager = next((stats[n] for n in live if n.startswith("eager/")), None)
        for n in live:
            v, st = variants[n], stats[n]
            rep["results"].append({"backend": v.backend, "batch": batch, "precision": v.precision,
                                   **{k: st[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput")},
                                   "peak_mem_mb": None,
                                   "speedup_vs_eager": eager["p50_ms"] / st["p50_ms"] if eager else None,
                                   "samples": st["samples"]})
            cost = roofline.model_cost(config, batch, v.precision, shape)
            rep["roofline"].append({"backend": v.backend, "batch": batch, "precision": v.precision,
                                    **roofline.achieved(cost, st["p50_ms"], head["device"]["name"], v.precision)})
        rep["stage_costs"][str(batch)] = roofline.model_cost(config, batch, "fp32", shape)["stages"]
        out["done_batches"].append(batch)
        save()


def open_variants(spec: dict, out: dict, save: Callable[[], None]) -> dict:
    """Every variant of ``spec["variants"]`` (name -> engine directory) opened, warmed once at batch 1;
    one that fails to open is an error and is left out."""
    variants = {}
    for name, directory in spec["variants"].items():
        backend, precision = name.split("/")
        t0 = time.perf_counter()
        try:
            v = open_variant(Path(directory), backend, precision, None, spec["device"])
            config = v_config(Path(directory))
            v.predict(*make_inputs(config, 1))
        except Exception as e:
            out["errors"].append({"variant": name, "message": f"open: {type(e).__name__}: {first_line(e)}"})
            continue
        variants[name] = v
        out["opened"][name] = round(time.perf_counter() - t0, 2)
        save()
    return variants


def v_config(directory: Path):
    from stvfm_engine.engine.manifest import read_manifest
    from stvfm_engine.model.config import STVFMConfig

    return STVFMConfig.from_dict(read_manifest(directory)["config"])


# ----------------------------------------------------------------------------- the tasks
def task_prepare(spec: dict, out: dict, save) -> None:
    t0 = time.perf_counter()
    out["engine"] = str(prepare_engine(spec["preset"], Path(spec["work"]), spec["max_batch"], spec["device"]))
    out["seconds"] = round(time.perf_counter() - t0, 2)


def task_parity(spec: dict, out: dict, save) -> None:
    """One variant: build it if it is an artifact, open it, compare it with fp32 eager on the same device."""
    from stvfm_engine.engine.precision import get_precision

    variant, device = spec["variant"], spec["device"]
    t0 = time.perf_counter()
    directory = engine_for(variant, spec)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["engine"] = str(directory)
    save()
    reference = open_variant(Path(spec["work"]) / f"{spec['preset']}.engine", "eager", "fp32", None, device)
    t1 = time.perf_counter()
    v = open_variant(directory, variant["backend"], variant["precision"], None, device)
    out["open_s"] = round(time.perf_counter() - t1, 2)
    out.update(parity_of(v.predict, reference.predict, v_config(directory), spec["batches"]))
    out["tolerance"] = get_precision(v.precision).tolerance
    out["first_calls_s"] = round(time.perf_counter() - t1, 2)


def task_time(spec: dict, out: dict, save) -> None:
    """Open the variants, then time them at each batch of ``spec["plan"]`` (progress saved per batch)."""
    variants = open_variants(spec, out, save)
    if variants:
        config = v_config(Path(next(iter(spec["variants"].values()))))
        time_batches(variants, config, spec["plan"], spec, out, save, spec["command"])


def task_ops(spec: dict, out: dict, save) -> None:
    """The three fused stages (flow, token adapter, bcpc) of the triton path against the same stages of the
    eager model, both bf16 and un-graphed, CUDA events per stage; and the backbone's share of the bf16 peak."""
    from stvfm_engine.bench.stages import eager_stages, triton_stage_runner
    from stvfm_engine.engine.reference import reference_model

    device, batches = spec["device"], spec["batches"]
    reference = reference_model(Path(spec["engine"]))
    eager = copy.deepcopy(reference).to(device, torch.bfloat16)
    triton = triton_stage_runner(reference, "bf16", device, max(batches), spec["iters"], spec["warmup"])
    shape = roofline.backbone_shape(reference.config)
    name = report.device_info(device)["name"]
    peak = roofline.device_peak(name)
    out.update(rows=[], ratios={}, backbone={})
    for b in batches:
        x, tod, dow = (None if a is None else torch.from_numpy(a).to(device) for a in make_inputs(reference.config, b))
        rows = eager_stages(eager, x, tod, dow, spec["iters"], spec["warmup"]) + triton(b)
        out["rows"] += rows
        ms = {(r["runner"], r["stage"]): r["ms"] for r in rows}
        for stage, op in FUSED_STAGES.items():
            out["ratios"].setdefault(op, {})[str(b)] = ms[("eager", stage)] / ms[("triton", stage)]
        flops = roofline.model_cost(reference.config, b, "bf16", shape)["stages"]["backbone"]["flops"]
        tflops = flops / (ms[("triton", "backbone")] / 1e3) / 1e12
        out["backbone"][str(b)] = {"ms": ms[("triton", "backbone")], "flops": flops, "tflops": tflops,
                                   "peak_tflops": peak["tflops"]["bf16"] if peak else None,
                                   "fraction_of_peak": tflops / peak["tflops"]["bf16"] if peak else None}
        out.setdefault("done_batches", []).append(b)
        save()


def task_large(spec: dict, out: dict, save) -> None:
    """The second preset in one process: engine, parity of each variant against fp32 eager, timing."""
    from stvfm_engine.engine.precision import get_precision

    work, device = Path(spec["work"]), spec["device"]
    directory = prepare_engine(spec["preset"], work, spec["max_batch"], device)
    out["engine"] = str(directory)
    config = v_config(directory)
    reference = open_variant(directory, "eager", "fp32", None, device)
    variants, out["parity"] = {}, {}
    for v in spec["variant_list"]:
        name = variant_name(v["backend"], v["precision"])
        try:
            opened = open_variant(directory, v["backend"], v["precision"], None, device)
            p = parity_of(opened.predict, reference.predict, config, spec["batches"])
        except Exception as e:
            out["errors"].append({"variant": name, "message": f"{type(e).__name__}: {first_line(e)}"})
            continue
        out["parity"][name] = {**p, "tolerance": get_precision(opened.precision).tolerance}
        if p["max_rel_err"] <= out["parity"][name]["tolerance"]:  # the parent records a miss; it is not timed
            variants[name] = opened
        save()
    del reference
    time_batches(variants, config, spec["plan"], spec, out, save, spec["command"])


TASKS = {"prepare": task_prepare, "parity": task_parity, "time": task_time, "ops": task_ops, "large": task_large}


def main(argv: Optional[list[str]] = None) -> int:
    task, spec_path, out_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    out: dict[str, Any] = {"task": task, "errors": [], "opened": {}, "done_batches": [], "gpu_state": {}}
    out_path = Path(out_path)

    def save() -> None:
        write_result(out_path, out)

    started = time.perf_counter()
    code = 0
    torch.manual_seed(0)
    np.random.seed(0)
    try:
        TASKS[task](spec, out, save)
    except Exception as e:
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {first_line(e)}"
        code = 1
    out["seconds"] = round(time.perf_counter() - started, 2)
    save()
    return code


if __name__ == "__main__":
    sys.exit(main())
