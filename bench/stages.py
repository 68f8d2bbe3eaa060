"""Per-stage breakdown of one forward call: normalise+flow, token adapter, backbone, BCPC, head.

The eager model is run stage by stage with a marker around each stage: ``torch.profiler``'s
``record_function`` on a CPU (the stage's CPU time), CUDA events on a GPU (the stage's device time).
The Triton path (CPU only) is profiled as one call and its time is attributed by the ops its fused
kernels register (``stvfm::...``) and by its backbone module.
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


def eager_stages(model: STVFM, x: torch.Tensor, tod: Optional[torch.Tensor], dow: Optional[torch.Tensor],
                 iters: int = 10, warmup: int = 3) -> list[dict]:
    """Mean time per stage of the eager model over ``iters`` calls (after ``warmup`` calls)."""
    batch = x.shape[0]
    with torch.inference_mode():
        for _ in range(warmup):
            staged_forward(model, x, tod, dow)
        if x.is_cuda:
            marks = _CudaMarks()
            for _ in range(iters):
                staged_forward(model, x, tod, dow, marks)
            return _rows("eager", batch, marks.mean_ms(), "cuda_events")
        from torch.profiler import record_function

        events = _profile_cpu(lambda: staged_forward(model, x, tod, dow, record_function), iters)
    ms = {e.key: e.cpu_time_total / e.count / 1e3 for e in events if e.key in STAGES}
    return _rows("eager", batch, ms, "torch.profiler")


# Ops of the Triton path's fused kernels, by stage (``torch.ops.stvfm.*`` as the profiler names them).
TRITON_STAGE_OPS = {
    "normalise+flow": ("stvfm::flow_patchify",),
    "token adapter": ("stvfm::token_adapter",),
    "bcpc": ("stvfm::prompt_condition", "stvfm::bilateral_attention"),
}
_CALL = "stvfm-bench::call"


@contextlib.contextmanager
def _marked(module: Optional[torch.nn.Module], stage: str) -> Iterator[None]:
    """Wrap ``module``'s forward in ``record_function(stage)`` while inside."""
    if module is None:
        yield
        return
    from torch.profiler import record_function

    ranges = []
    pre = module.register_forward_pre_hook(lambda _m, _a: ranges.append(record_function(stage).__enter__()))
    post = module.register_forward_hook(lambda _m, _a, _o: ranges.pop().__exit__(None, None, None))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def triton_stages(forward: Callable[[], object], backbone: Optional[torch.nn.Module], batch: int,
                  iters: int = 3, warmup: int = 1) -> list[dict]:
    """Stage times of the Triton path (CPU) from one ``torch.profiler`` run over ``iters`` calls.

    The fused ops give normalise+flow, token adapter and BCPC, the ``backbone`` module's forward
    the backbone; ``head`` is the rest of the call (fusion linear, head, un-patchify). Under
    ``TRITON_INTERPRET=1`` the figures show where the interpreter spends its time, not what a GPU
    would do.
    """
    from torch.profiler import record_function

    def call():
        with record_function(_CALL):
            forward()

    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        with _marked(backbone, "backbone"):
            events = _profile_cpu(call, iters)
    ms = {stage: 0.0 for stage in STAGES}
    total = 0.0
    for e in events:
        t = e.cpu_time_total / iters / 1e3
        if e.key == _CALL:
            total = t
        elif e.key == "backbone":
            ms["backbone"] += t
        for stage, names in TRITON_STAGE_OPS.items():
            if e.key in names:
                ms[stage] += t
    ms["head"] = max(total - sum(ms.values()), 0.0)
    return _rows("triton", batch, ms, "torch.profiler")
