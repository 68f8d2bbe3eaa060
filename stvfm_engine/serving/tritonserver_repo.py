"""Triton model repositories (``REPO/<name>/config.pbtxt`` + ``1/<artifact>``) written with Triton's own
model-config protobuf: a temporary one for ``serve``, a self-contained one for ``export-triton``."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from stvfm_engine.engine import Engine
from stvfm_engine.engine.graph import FEATURES_NAME, TOKENS_NAME
from stvfm_engine.engine.manifest import MANIFEST_NAME, artifact_files
from stvfm_engine.engine.registry import BACKENDS
from stvfm_engine.errors import ServeError
from stvfm_engine.export.atomic_dir import atomic_directory
from stvfm_engine.serving.models import ServedModel, models_of

CONFIG_NAME = "config.pbtxt"
VERSION = "1"
PYTHON = "python"  # the Python-backend platform: runs stvfm_engine.Engine inside Triton
MODEL_PY = Path(__file__).with_name("tritonserver_model.py")


def platforms() -> tuple[str, ...]:
    """``export-triton --platform`` choices: the artifact backends Triton runs natively, then ``python``."""
    return (*(b.name for b in BACKENDS.values() if b.triton_platform), PYTHON)


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ServeError("Triton model configs need tritonclient: pip install 'stvfm-engine[serve]'") from None
    return model_config_pb2, text_format


@dataclass(frozen=True)
class QueuePolicy:
    """Admission of a served model's dynamic batcher: at most ``max_queue`` requests waiting (beyond it
    Triton refuses at once with UNAVAILABLE), each refused once queued longer than ``timeout_us``."""

    max_queue: int
    timeout_us: int


def model_config(model: ServedModel, platform: str, parameters: Optional[dict[str, str]] = None,
                 max_queue_delay_us: int = 2000, instances: int = 1, gpu: bool = False,
                 queue: Optional[QueuePolicy] = None):
    """The ``ModelConfig`` protobuf of ``model``: I/O dims without the batch axis, ``max_batch_size`` =
    the engine's max batch, Triton's dynamic batcher (with ``queue``'s ``default_queue_policy``),
    ``instances`` instances on the CPU (or GPU)."""
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=model.name, max_batch_size=model.max_batch)
    if platform == PYTHON:
        cfg.backend = "python"
    else:
        cfg.platform = BACKENDS[platform].triton_platform
    io = model.io()
    for side, field in (("inputs", cfg.input), ("outputs", cfg.output)):
        for t in io[side]:
            kind = "STRING" if t["datatype"] == "BYTES" else t["datatype"]  # Triton's config name of BYTES
            tensor = field.add(name=t["name"], data_type=pb.DataType.Value(f"TYPE_{kind}"), dims=t["dims"])
            if t.get("optional"):
                tensor.optional = True
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    if queue is not None:
        policy = cfg.dynamic_batching.default_queue_policy
        policy.max_queue_size = queue.max_queue
        policy.default_timeout_microseconds = queue.timeout_us
        policy.timeout_action = pb.ModelQueuePolicy.REJECT
    kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=instances, kind=kind)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def read_config(path: str | os.PathLike):
    """Parse a ``config.pbtxt`` with Triton's protobuf; a malformed one is a one-line :class:`ServeError`."""
    pb, text_format = _pb()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except text_format.ParseError as e:
        raise ServeError(f"{path}: not a Triton model config ({e})") from None


def _write_config(model_dir: Path, cfg) -> None:
    _, text_format = _pb()
    path = model_dir / CONFIG_NAME
    path.write_text(text_format.MessageToString(cfg))
    if read_config(path) != cfg:  # what Triton will read is what was meant
        raise ServeError(f"{path}: the written config does not parse back to the same model config")


def write_serving_repository(models: Sequence[ServedModel], root: Path, max_queue_delay_us: int,
                             instances: int = 1, queues: Optional[dict[str, QueuePolicy]] = None,
                             backbone_timeout_us: int = 0) -> Path:
    """Python-backend models in ``root`` that open the engine directories where they are (no copies),
    each admitting requests by ``queues[name]`` if given (``serve`` gives none: its front admits them,
    see :mod:`~stvfm_engine.serving.front`).

    The models of a multi-model directory share one backbone model (:func:`backbone_models`): each of
    them runs its own parts and sends its backbone pass there as a BLS request, which gives up after
    ``backbone_timeout_us`` (else the model's queue timeout; 0: never)."""
    shared = backbone_models(models)
    queues = queues or {}
    for model in models:
        params = model.load_parameters()
        queue = queues.get(model.name)
        if model.directory in shared:
            params["backbone_model"] = shared[model.directory]
            timeout_us = backbone_timeout_us or (queue.timeout_us if queue is not None else 0)
            if timeout_us:
                params["backbone_timeout_us"] = str(timeout_us)
        _write_python_model(root / model.name, model_config(model, PYTHON, params, max_queue_delay_us, instances,
                                                            queue=queue))
    for directory, name in shared.items():
        first = next(m for m in models if m.directory == directory)
        _write_python_model(root / name, backbone_config(name, first, max_queue_delay_us))
    return root


def backbone_models(models: Sequence[ServedModel]) -> dict[str, str]:
    """``{engine directory: backbone model name}`` for each multi-model directory among ``models``:
    ``_backbone`` then ``_backbone_2``, ... (names no served model has)."""
    taken = {m.name for m in models}
    out: dict[str, str] = {}
    for m in models:
        if m.key is not None and m.directory not in out:
            n, name = 1, "_backbone"
            while name in taken:
                n += 1
                name = f"_backbone_{n}"
            taken.add(name)
            out[m.directory] = name
    return out


def backbone_config(name: str, model: ServedModel, max_queue_delay_us: int):
    """The shared backbone of ``model``'s multi-model directory as a Triton model: tokens ``[N, L, D]`` in,
    features out, the sequence axis batched (``2 * max batch``), ONE instance (one backbone in memory);
    its dynamic batcher joins the passes of different models whose tensors have the same shape."""
    pb, _ = _pb()
    cfg = pb.ModelConfig(name=name, max_batch_size=2 * model.max_batch, backend="python")
    cfg.input.add(name=TOKENS_NAME, data_type=pb.DataType.Value("TYPE_FP32"), dims=[-1, -1])
    cfg.output.add(name=FEATURES_NAME, data_type=pb.DataType.Value("TYPE_FP32"), dims=[-1, -1])
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.dynamic_batching.default_queue_policy.allow_timeout_override = True  # each BLS request's own timeout
    cfg.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    params = {k: v for k, v in model.load_parameters().items() if k != "model_key"}
    for key, value in {**params, "role": "backbone"}.items():
        cfg.parameters[key].string_value = value
    return cfg


def _write_python_model(model_dir: Path, cfg) -> None:
    (model_dir / VERSION).mkdir(parents=True)
    shutil.copyfile(MODEL_PY, model_dir / VERSION / "model.py")
    _write_config(model_dir, cfg)


def export_repository(directory: str | os.PathLike, repo: str | os.PathLike, platform: str = "onnxruntime",
                      name: Optional[str] = None, backend: Optional[str] = None, max_queue_delay_us: int = 2000,
                      instances: int = 1) -> list[Path]:
    """Write ``REPO/<name>`` for each model of the engine ``directory``; returns the model directories.

    ``platform``: ``onnxruntime`` (``model.onnx`` as ``onnxruntime_onnx``), ``tensorrt`` (``model.plan``
    as ``tensorrt_plan``) or ``python`` (``model.py`` running ``Engine`` on a copy of the engine directory;
    ``backend`` pins its backend, default: the fastest the serving machine allows). Each model directory
    is written in a temp sibling and renamed into place: an existing one is replaced whole or not at all.
    """
    if platform not in platforms():
        raise ServeError(f"unknown platform {platform!r}; expected one of {list(platforms())}")
    if backend and platform != PYTHON:
        raise ServeError(f"--backend picks the engine backend of --platform python; --platform {platform} "
                         "runs the artifact in Triton's own backend")
    engine = Engine.load(directory)  # checks every file the manifest lists before anything is copied
    models = models_of(engine, name)
    files: list[str] = []
    if platform != PYTHON:
        entry = engine.manifest["backends"].get(platform)
        if entry is None:
            raise ServeError(f"{engine.directory} holds no {platform} artifact (built: "
                             f"{sorted(engine.manifest['backends'])}); rebuild with --backends {platform} "
                             "or export --platform python")
        if len(models) > 1:
            raise ServeError(f"{engine.directory} holds several models; --platform {platform} exports one model's "
                             "artifact: use --platform python")
        files = artifact_files(engine.manifest["files"], [entry["file"]])
        gpu = "cpu" not in BACKENDS[platform].devices or entry["device"].startswith("cuda")
    out = []
    for model in models:
        target = Path(repo) / model.name
        with atomic_directory(target, marker=CONFIG_NAME, kind="a Triton model directory") as tmp:
            version = tmp / VERSION
            version.mkdir()
            if platform == PYTHON:
                shutil.copyfile(MODEL_PY, version / "model.py")
                engine_copy = version / "engine"
                engine_copy.mkdir()
                for f in [MANIFEST_NAME, *engine.manifest["files"]]:
                    (engine_copy / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(engine.directory / f, engine_copy / f)
                params = {**model.load_parameters(), "engine_dir": "engine", "backend": backend or "auto"}
                params.pop("threads", None)
                cfg = model_config(model, PYTHON, params, max_queue_delay_us, instances)
            else:
                for f in files:  # the artifact keeps its file name: model.onnx (+ model.onnx.data), model.plan
                    shutil.copyfile(engine.directory / f, version / f)
                cfg = model_config(model, platform, None, max_queue_delay_us, instances, gpu=gpu)
                cfg.default_model_filename = entry["file"]
            _write_config(tmp, cfg)
        out.append(target)
    return out
