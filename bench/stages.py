"""Per-stage breakdown of one forward call: normalise+flow, token adapter, backbone, BCPC, head.

The eager model and the Triton path are each run stage by stage with a marker around each stage:
``torch.profiler``'s ``record_function`` on a CPU (the stage's CPU time), a pair of CUDA events on a
GPU (the stage's device time, launch gaps included). The Triton path is timed through its un-graphed
forward (:meth:`~stvfm_engine.engine.backends.triton.TritonPredictor.forward`): at small batches, where
its CUDA graphs remove the launch gaps, these stage times overstate what a replay costs.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from stvfm_engine.bench.roofline import STAGES
from stvfm_engine.model.stvfm import STVFM, normalize, patchify, temporal_difference

Marker = Callable[[str], contextlib.AbstractContextManager]


def staged_forward(model: STVFM, x: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                   mark: Marker = lambda name: contextlib.nullcontext()) -> torch.Tensor:
    """``model(x, tod, dow)`` split into the five stages of :data:`STAGES`, each inside ``mark(stage)``.

    Same computation as :meth:`STVFM.forward` (``embed_tokens`` opened into its two stages).
    """
    B, p = x.shape[0], model.config.patch
    with mark("normalise+flow"):
        xn = normalize(x, model.norm_mean, model.norm_std)
        u_r, u_f = patchify(xn, p), patchify(temporal_difference(xn), p)
    with mark("token adapter"):
        pos = model.backbone.patch_pos
        z = torch.cat([model.adapter_r(u_r, tod, dow, pos), model.adapter_f(u_f, tod, dow, pos)], dim=0)
    with mark("backbone"):
        h = model.backbone(z)
    with mark("bcpc"):
        fused = model.bcpc(h[:B], h[B:])
    with mark("head"):
        return model.decode(fused)


class _CudaMarks:
    """Stage marker recording a pair of CUDA events per stage and call."""

    def __init__(self):
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {s: [] for s in STAGES}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events[name].append((start, end))

    def mean_ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {s: sum(a.elapsed_time(b) for a, b in ev) / len(ev) for s, ev in self.events.items() if ev}


def _rows(runner: str, batch: int, ms: dict[str, float], timer: str) -> list[dict]:
    total = sum(ms.values()) or 1.0
    return [{"runner": runner, "batch": batch, "stage": s, "ms": ms.get(s, 0.0),
             "fraction": ms.get(s, 0.0) / total, "timer": timer} for s in STAGES]


def _profile_cpu(fn: Callable[[], object], iters: int) -> "torch.autograd.profiler_util.EventList":
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    return prof.key_averages()


def stage_times(runner: str, staged: Callable[[Marker], object], batch: int, cuda: bool, iters: int = 10,
                warmup: int = 3) -> list[dict]:
    """Mean time per stage of ``staged(mark)`` (one forward call, each stage inside ``mark(stage)``)."""
    for _ in range(warmup):
        staged(lambda name: contextlib.nullcontext())
    if cuda:
        marks = _CudaMarks()
        for _ in range(iters):
            staged(marks)
        return _rows(runner, batch, marks.mean_ms(), "cuda_events")
    from torch.profiler import record_function

    events = _profile_cpu(lambda: staged(record_function), iters)
    ms = {e.key: e.cpu_time_total / e.count / 1e3 for e in events if e.key in STAGES}
    return _rows(runner, batch, ms, "torch.profiler")


def eager_stages(model: STVFM, x: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                 iters: int = 10, warmup: int = 3) -> list[dict]:
    """Mean time per stage of the eager ``model`` (fp32, or a reduced-precision copy: ``x`` is cast to it)."""
    x = x.to(next(model.parameters()).dtype)
    with torch.inference_mode():
        return stage_times("eager", lambda mark: staged_forward(model, x, tod, dow, mark), x.shape[0], x.is_cuda,
                           iters, warmup)


def triton_stage_runner(reference: STVFM, precision: str, device: str, max_batch: int, iters: int = 10,
                        warmup: int = 3) -> Callable[[int], list[dict]]:
    """``run(batch) -> rows``: the Triton path's stage breakdown at ``precision`` on ``device``, timed on an
    un-graphed predictor of its own, on :func:`~stvfm_engine.bench.runner.make_inputs` inputs."""
    from stvfm_engine.bench.runner import make_inputs  # runner imports this module
    from stvfm_engine.engine.backends.triton import load_triton_backend

    fn = load_triton_backend(reference, precision, device, max_batch=max_batch, cuda_graphs=False)

    def run(batch: int) -> list[dict]:
        x, tod, dow = (None if a is None else torch.from_numpy(a).to(fn.device)
                       for a in make_inputs(reference.config, batch))
        return triton_stages(fn, x, tod, dow, iters, warmup)

    return run


def triton_stages(predictor, x: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                  iters: int = 10, warmup: int = 3) -> list[dict]:
    """Mean time per stage of a :class:`~stvfm_engine.engine.backends.triton.TritonPredictor`'s forward on
    device tensors. Under ``TRITON_INTERPRET=1`` the figures show where the interpreter spends its
    time, not what a GPU would do."""
    # no_grad (the forward's own mode), not inference_mode: a compiled backbone keeps its guards
    return stage_times("triton", lambda mark: predictor.forward(x, tod, dow, mark), x.shape[0], x.is_cuda,
                       iters, warmup)
