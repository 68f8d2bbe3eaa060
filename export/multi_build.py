"""``build_multi_engine``: checkpoints that share one frozen backbone -> one multi-model engine directory.

The backbone is stored (``backbone.safetensors``) and built once per backend, each model's own parts
apart (``models/NAME/``); every model must pass the parity gate against its own reference model through
the runtime's backend. Artifacts come from the build cache (:mod:`stvfm_engine.export.cache`) wherever
what they are built from is unchanged, so a rebuild after retraining one model re-exports only its parts.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from stvfm_engine.engine.manifest import (BACKBONE_WEIGHTS_NAME, MULTI_FORMAT_VERSION, WEIGHTS_NAME, artifact_files,
                                          check_model_name, file_record, file_table, library_versions, model_file,
                                          write_manifest)
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.registry import BACKENDS, DEFAULT_MAX_BATCH, MultiBuildContext
from stvfm_engine.engine.session import Built, open_session
from stvfm_engine.export.atomic_dir import atomic_directory
from stvfm_engine.export.auto import auto_multi
from stvfm_engine.export.records import manifest_head, model_record
from stvfm_engine.export.build import (check_max_batch, normalize_build_device,
                                       resolve_backends, save_weights)
from stvfm_engine.export.cache import BuildCache, cache_key, cached, default_cache_dir, tensors_digest
from stvfm_engine.export.onnx_export import export_backbone, export_parts
from stvfm_engine.export.parity import check_parity
from stvfm_engine.export.progress import BuildProgress
from stvfm_engine.model.checkpoint import model_from_checkpoint, read_checkpoint
from stvfm_engine.model.stvfm import BACKBONE_PREFIX, STVFM
from stvfm_engine.errors import BuildError, EngineDirError

BACKBONE_ONNX, PRE_ONNX, POST_ONNX = "backbone.onnx", "pre.onnx", "post.onnx"


def backbone_state(model: STVFM) -> dict[str, torch.Tensor]:
    """The frozen backbone's tensors (state-dict names ``backbone.*``)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIX)}


def own_state(model: STVFM) -> dict[str, torch.Tensor]:
    """Everything but the backbone: normalisation, token adapters, prompts, coordination, head."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}


def model_names(checkpoints: Sequence[Path], names: Optional[Sequence[str] | str] = None) -> list[str]:
    """One unique, plain name per checkpoint: ``names`` (a list or a comma list), else the files' stems."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    if names is None:
        names = [p.stem for p in checkpoints]
    elif len(names) != len(checkpoints):
        raise BuildError(f"got {len(names)} names for {len(checkpoints)} checkpoints; give one name per checkpoint")
    try:
        names = [check_model_name(n) for n in names]
    except EngineDirError as e:
        raise BuildError(f"{e} (name the models with --names)") from None
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise BuildError(f"two models would share the name {dupes[0]!r}; name them apart with --names")
    return names


def check_shared_backbone(models: dict[str, STVFM], checkpoints: Sequence[Path]) -> None:
    """Refuse, naming the checkpoint and the first differing tensor, models whose backbones are not identical
    (same timm model and layer count, every backbone tensor bit-equal)."""
    first, first_path = next(iter(models.values())), checkpoints[0]
    ref, c0 = backbone_state(first), first.config
    for (name, model), path in list(zip(models.items(), checkpoints))[1:]:
        c = model.config
        if (c.backbone, c.backbone_layers) != (c0.backbone, c0.backbone_layers):
            raise BuildError(f"{path}: backbone {c.backbone} with {c.backbone_layers} layers, but {first_path} has "
                             f"{c0.backbone} with {c0.backbone_layers}; a multi-model engine needs one shared backbone")
        state = backbone_state(model)
        for key in sorted(ref):
            a, b = ref[key], state[key]
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.reshape(-1).view(torch.uint8),
                                                                           b.reshape(-1).view(torch.uint8)):
                raise BuildError(f"{path}: backbone tensor {key} differs from {first_path}'s; a multi-model engine "
                                 "needs checkpoints that share one frozen backbone bit for bit")


def build_multi_engine(checkpoints: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                       names: Optional[Sequence[str] | str] = None, backends: Optional[Sequence[str] | str] = None,
                       precision: str = "fp32", device: str = "cpu", max_batch: int = DEFAULT_MAX_BATCH,
                       progress: bool = True, cache_dir: Optional[str | os.PathLike] = None, use_cache: bool = True,
                       threads: Optional[int] = None) -> Path:
    """Build the multi-model engine directory ``output_dir`` from ``checkpoints``; return its path.

    ``names``: one per checkpoint (default: the files' stems). ``backends``: artifact backends whose
    registry record has ``multi_model`` (None: all this machine can build); the directory also serves the
    weights backends that have it (``eager``). fp32 only; ``precision="auto"`` builds every backend that
    serves many models, times them (``threads``, interleaved) and records the fastest as the default.
    ``threads``: intra-op threads of the gates' and the timing's sessions. ``max_batch``: samples per backbone call and per
    request. Artifacts are taken from / added to the build cache in ``cache_dir`` (default
    :func:`~stvfm_engine.export.cache.default_cache_dir`) unless ``use_cache`` is False. A failed build leaves
    ``output_dir`` as it was.
    """
    auto = precision == "auto"
    prec = get_precision("fp32" if auto else precision)
    if prec.name != "fp32":
        raise BuildError(f"multi-model engines are built at fp32 only, not {prec.name}; "
                         "build reduced-precision engines one model at a time")
    device = normalize_build_device(device)
    check_max_batch(max_batch)
    chosen = resolve_backends(backends, device, prec, multi_model=True)
    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise BuildError("no checkpoints given; expected one or more")
    labels = model_names(paths, names)
    models = {label: model_from_checkpoint(read_checkpoint(p), source=str(p)) for label, p in zip(labels, paths)}
    check_shared_backbone(models, paths)
    first = next(iter(models.values()))
    c0 = first.config
    backbone_digest = tensors_digest(backbone_state(first), {"timm": c0.backbone, "layers": c0.backbone_layers})
    model_digests = {label: tensors_digest(own_state(m), {"config": m.config.to_dict(), "backbone": backbone_digest})
                     for label, m in models.items()}
    cache = BuildCache(cache_dir or default_cache_dir()) if use_cache else None
    target = Path(output_dir).absolute()
    ui = BuildProgress(enabled=progress)
    started = time.perf_counter()
    with ui, atomic_directory(target) as tmp:
        with ui.stage("weights", f"{BACKBONE_WEIGHTS_NAME} + each model's own weights + checkpoint sha256"):
            save_weights(backbone_state(first), tmp / BACKBONE_WEIGHTS_NAME)
            for label, m in models.items():
                save_weights(own_state(m), tmp / model_file(label, WEIGHTS_NAME))
            records = {label: {"file": p.name, **file_record(p)} for label, p in zip(labels, paths)}
        ctx = MultiBuildContext(models, tmp, prec, device, max_batch, _backbone_once(first, tmp, max_batch, ui),
                                _parts_once(models, tmp, max_batch, ui), ui.stage)
        common = {"precision": prec.name, "device": device, "max_batch": max_batch, "versions": library_versions()}
        entries, parts = {}, {label: {} for label in models}
        for b in chosen:
            entries[b] = _build_backend(b, ctx, cache, {**common, "backend": b}, backbone_digest, model_digests, parts,
                                        ui)
        manifest = {
            **manifest_head(MULTI_FORMAT_VERSION, prec, device, max_batch),
            "backbone": {"timm": c0.backbone, "layers": c0.backbone_layers, "dim": first.dim,
                         "prefix_tokens": first.backbone.num_prefix_tokens, "sha256": backbone_digest,
                         "weights": BACKBONE_WEIGHTS_NAME},
            "models": {label: {**model_record(m, records[label], max_batch), "weights": model_file(label, WEIGHTS_NAME),
                               "sequence_length": m.sequence_length, "backends": parts[label]}
                       for label, m in models.items()},
            "files": file_table(tmp),
            "backends": entries,
        }
        run_device = {b: _parity_gate(b, manifest, ctx, cache, {**common, "backend": b}, model_digests, ui, threads)
                      for b in chosen}
        if auto:
            manifest["default"], manifest["auto"] = auto_multi(ctx, manifest, chosen, run_device, threads)
        manifest["build_seconds"] = round(time.perf_counter() - started, 3)
        write_manifest(tmp, manifest)
    hits = sum(str(e.get("cache", "")).startswith("hit") for e in entries.values())
    ui.note(f"engine written to {target} ({len(models)} models on one backbone; {', '.join(chosen)}; backbone "
            f"artifacts from the cache: {hits}/{len(entries)}; {manifest['build_seconds']:.1f} s)")
    return Path(output_dir)


def _backbone_once(model: STVFM, directory: Path, max_batch: int, ui: BuildProgress) -> Callable[[], Path]:
    @functools.cache
    def backbone_onnx() -> Path:
        with ui.stage("onnx", f"export + onnx.checker: shared backbone ({model.config.backbone})"):
            return export_backbone(model, directory / BACKBONE_ONNX, max_batch)

    return backbone_onnx


def _parts_once(models: dict[str, STVFM], directory: Path, max_batch: int,
                ui: BuildProgress) -> Callable[[str], tuple[Path, Path]]:
    @functools.cache
    def parts_onnx(name: str) -> tuple[Path, Path]:
        with ui.stage("onnx", f"export + onnx.checker: {name} pre/post"):
            return export_parts(models[name], directory / model_file(name, PRE_ONNX),
                                directory / model_file(name, POST_ONNX), max_batch)

    return parts_onnx


def _build_backend(name: str, ctx: MultiBuildContext, cache: Optional[BuildCache], common: dict,
                   backbone_digest: str, model_digests: dict[str, str], parts: dict[str, dict],
                   ui: BuildProgress) -> dict:
    """One backend's backbone artifact and every model's parts (from the cache where sound); the backbone's
    manifest record (each model's goes into ``parts``)."""
    impl, tmp = BACKENDS[name].impl(), ctx.directory
    t0 = time.perf_counter()
    about = {**common, "artifact": "backbone", "backbone": backbone_digest}
    roles, how = cached(cache, cache_key(**about), about, tmp, lambda: {"file": impl.build_backbone(ctx).path})
    ui.note(f"{name} backbone: cache {how}")
    entry = {"file": roles["file"].relative_to(tmp).as_posix(), "precision": ctx.precision.name, "device": ctx.device,
             "cache": how, "build_seconds": round(time.perf_counter() - t0, 3)}
    for label in ctx.models:
        t0 = time.perf_counter()
        about = {**common, "artifact": "parts", "model": model_digests[label]}
        dest = tmp / model_file(label, "")
        dest.mkdir(parents=True, exist_ok=True)
        roles, how = cached(cache, cache_key(**about), about, dest, lambda: impl.build_parts(ctx, label))
        ui.note(f"{name} {label} pre/post: cache {how}")
        parts[label][name] = {"pre": roles["pre"].relative_to(tmp).as_posix(),
                              "post": roles["post"].relative_to(tmp).as_posix(),
                              "cache": how, "build_seconds": round(time.perf_counter() - t0, 3)}
    return entry


def _parity_gate(name: str, manifest: dict, ctx: MultiBuildContext, cache: Optional[BuildCache], common: dict,
                 model_digests: dict[str, str], ui: BuildProgress, threads: Optional[int] = None) -> str:
    """Every model through the backend's runtime against its own fp32 reference (recorded in the manifest).

    A model whose exact artifacts (backbone and parts, by sha256) already passed the gate against the
    same reference weights, with the same libraries, takes that recorded result from the cache
    (``"cache": "hit"`` in its parity record) instead of running it again.
    """
    spec, prec = BACKENDS[name], ctx.precision
    run_device = "cpu" if spec.portable and spec.why_not_run(ctx.device) else ctx.device
    manifest["backends"][name]["device"] = run_device
    files = manifest["files"]
    backbone_files = _artifact_hashes(files, [manifest["backends"][name]["file"]])
    session = None
    with ctx.stage(name, f"parity gate of {len(ctx.models)} models on {run_device}"):
        for label, model in ctx.models.items():
            record = manifest["models"][label]["backends"][name]
            about = {**common, "artifact": "parity", "run_device": run_device, "tolerance": prec.tolerance,
                     "model": model_digests[label], "backbone_files": backbone_files,
                     "parts_files": _artifact_hashes(files, [record["pre"], record["post"]])}
            key = cache_key(**about)
            result = cache.load_record(key) if cache is not None else None
            if result is None:
                if session is None:
                    session = open_session(Built(ctx.directory, manifest, references=lambda: ctx.models), name,
                                           prec.name, run_device, threads)
                result = check_parity(f"{name} ({label})", functools.partial(session.predict, label), model,
                                      prec, ctx.max_batch)
                if cache is not None:
                    with contextlib.suppress(OSError):  # a cache that cannot be written does not fail the build
                        cache.save_record(key, result, about)
                record["parity"] = {**result, "cache": "miss" if cache is not None else "off"}
            else:
                record["parity"] = {**result, "cache": "hit"}
            how = "the recorded result of these artifacts" if record["parity"]["cache"] == "hit" else "run now"
            ui.note(f"{name} {label}: max relative error {record['parity']['max_rel_err']:.2e} "
                    f"(tolerance {prec.tolerance:g}; {how})")
    return run_device


def _artifact_hashes(files: dict, names: list[str]) -> dict[str, str]:
    """sha256 of each named file and its companions (``NAME.*``) from the manifest's file table, by file name."""
    return {Path(f).name: files[f]["sha256"] for f in artifact_files(files, names)}
