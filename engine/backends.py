"""The runtime backends: each opens what it serves and becomes a :class:`Runner` on validated inputs.

``onnxruntime``, ``aoti`` and ``tensorrt`` run a built artifact (``model.onnx``, ``model.pt2``,
``model.plan``); ``eager`` and ``triton`` run the reference model rebuilt from
``weights.safetensors``. The same names are used by ``build --backends``, the manifest, ``Engine.load``,
``run --backend``, ``inspect`` and ``bench``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from stvfm_engine.errors import STVFMError
from stvfm_engine.export.graph import OUTPUT_NAME, ServingModel, input_names
from stvfm_engine.export.precision import Precision
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import STVFM

ARTIFACT_BACKENDS = ("onnxruntime", "aoti", "tensorrt")
WEIGHT_BACKENDS = ("eager", "triton")
BACKENDS = ARTIFACT_BACKENDS + WEIGHT_BACKENDS
ARTIFACT_FILES = {"onnxruntime": "model.onnx", "aoti": "model.pt2", "tensorrt": "model.plan"}


class BackendError(STVFMError):
    """A backend that cannot run here, or an artifact it cannot open."""


def cuda_status() -> Optional[str]:
    """None when a CUDA device is usable, else why not."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no CUDA device"
    return None


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def run_status(backend: str, device: str) -> Optional[str]:
    """None when ``backend`` can run on ``device`` on this machine, else why not (one line)."""
    cuda = torch.device(device).type == "cuda"
    if cuda and (why := cuda_status()):
        return why
    if backend == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'stvfm-engine[onnx]')"
        if cuda and "CUDAExecutionProvider" not in _ort_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
        return None
    if backend == "aoti":
        return None if hasattr(torch._inductor, "aoti_load_package") else f"torch {torch.__version__} lacks aoti_load_package"
    if backend == "tensorrt":
        if not cuda:
            return "TensorRT runs on CUDA devices only"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (pip install 'stvfm-engine[gpu]')"
        return None
    if backend == "eager":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if importlib.util.find_spec("stvfm_engine.engine.triton_backend") is None:
            return "this stvfm-engine has no Triton backend module (stvfm_engine.engine.triton_backend)"
        return None
    return f"unknown backend {backend!r}; expected one of {list(BACKENDS)}"


def _major_minor(version: Any) -> Optional[tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def _installed(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_problem(backend: str, manifest: dict[str, Any]) -> Optional[str]:
    """None when this machine's libraries can load ``backend``'s artifact as the manifest records it
    was built, else why not: ``model.pt2`` needs the torch major.minor it was built with, ``model.plan``
    the exact TensorRT version. ONNX Runtime checks the ONNX file's opset itself when it opens it;
    ``eager`` and ``triton`` run from the weights and need no particular version."""
    versions = manifest.get("versions") or {}
    if backend == "aoti":
        built, here = versions.get("torch"), torch.__version__
        if _major_minor(built) is None or _major_minor(built) != _major_minor(here):
            return (f"model.pt2 was built with torch {built}, this is torch {here} "
                    "(an AOTInductor package needs the torch major.minor it was built with)")
    if backend == "tensorrt":
        built, here = versions.get("tensorrt"), _installed("tensorrt")
        if here is not None and built != here:
            return f"model.plan was built with TensorRT {built}, this is TensorRT {here} (a plan needs the exact version)"
    return None


def rebuild_hint(directory: str | Path) -> str:
    return f"rebuild it on this machine: stvfm-engine build CKPT -o {directory}"


# ----------------------------------------------------------------------------- tensors in and out
def _to_torch(a: Any, device: torch.device) -> Optional[torch.Tensor]:
    if a is None:
        return None
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
    return t.to(device, non_blocking=False).contiguous()


def _to_numpy(a: Any) -> Optional[np.ndarray]:
    if a is None:
        return None
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def _output(y: torch.Tensor) -> np.ndarray:
    return y.detach().to("cpu", torch.float32).numpy()


class Runner:
    """``runner(x, tod, dow) -> np.ndarray`` float32 ``[B, T_out, C, H, W]`` on validated inputs.

    ``thread_safe`` False means the Engine serialises calls to it with a lock.
    """

    thread_safe = True

    def __call__(self, x, tod, dow) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime with full graph optimisation; IO binding on CUDA (device-resident in and out)."""

    def __init__(self, path: Path, config: STVFMConfig, device: torch.device, threads: Optional[int]):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.device = device
        if device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"onnxruntime {ort.__version__} cannot open {path} (e.g. an opset it does not support; "
                               f"{rebuild_hint(path.parent)}): {str(e).strip().splitlines()[0]}") from None
        self.names = input_names(config)
        self.out_tail = [config.horizon, config.channels, config.height, config.width]

    def __call__(self, x, tod, dow) -> np.ndarray:
        values = [x, tod, dow][: len(self.names)]
        if self.device.type != "cuda":
            return self.session.run([OUTPUT_NAME], {n: _to_numpy(v) for n, v in zip(self.names, values)})[0]
        tensors = [_to_torch(v, self.device) for v in values]
        y = torch.empty([tensors[0].shape[0], *self.out_tail], dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        idx = self.device.index or 0
        for name, t in zip(self.names, tensors):
            dtype = np.float32 if t.dtype == torch.float32 else np.int64
            binding.bind_input(name, "cuda", idx, dtype, list(t.shape), t.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", idx, np.float32, list(y.shape), y.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        self.session.run_with_iobinding(binding)
        return _output(y)


class AOTIRunner(Runner):
    """An AOTInductor package (``model.pt2``) loaded with ``torch._inductor.aoti_load_package``."""

    thread_safe = False  # one runner per package: calls are serialised (pytorch 148937)

    def __init__(self, path: Path, device: torch.device):
        kwargs = {"device_index": device.index} if device.type == "cuda" and device.index is not None else {}
        try:
            self.fn = torch._inductor.aoti_load_package(str(path), **kwargs)
        except Exception as e:  # the loader raises RuntimeError and friends from C++
            raise BackendError(f"cannot load AOTInductor package {path}: {str(e).strip().splitlines()[0]}") from None
        self.device = device

    def __call__(self, x, tod, dow) -> np.ndarray:
        args = [_to_torch(v, self.device) for v in (x, tod, dow) if v is not None]
        with torch.inference_mode():
            y = self.fn(*args)
        return _output(y[0] if isinstance(y, (list, tuple)) else y)


class TensorRTRunner(Runner):
    """A TensorRT 10 engine (``model.plan``), run through the name-based tensor API.

    Untested here: neither this project's machines nor the lent GPU have TensorRT.
    """

    thread_safe = False  # one execution context

    def __init__(self, path: Path, config: STVFMConfig, device: torch.device):
        import tensorrt as trt

        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise BackendError(f"TensorRT cannot deserialize {path} (built by another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device)
        self.names = input_names(config)

    def __call__(self, x, tod, dow) -> np.ndarray:
        tensors = [_to_torch(v, self.device) for v in (x, tod, dow)[: len(self.names)]]
        for name, t in zip(self.names, tensors):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        y = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(OUTPUT_NAME, y.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return _output(y)


class TorchRunner(Runner):
    """A torch callable on torch tensors: the ``eager`` reference model or the ``triton`` path."""

    def __init__(self, fn: Callable[..., torch.Tensor], device: torch.device, thread_safe: bool):
        self.fn = fn
        self.device = device
        self.thread_safe = thread_safe

    def __call__(self, x, tod, dow) -> np.ndarray:
        args = [_to_torch(v, self.device) for v in (x, tod, dow)]
        with torch.inference_mode():
            return _output(self.fn(*args))


def open_backend(backend: str, directory: Path, config: STVFMConfig, precision: Precision, device: str | torch.device,
                 threads: Optional[int] = None, reference: Optional[Callable[[], STVFM]] = None) -> Runner:
    """Open ``backend`` of the engine in ``directory`` on ``device``.

    ``reference`` builds the fp32 reference model (for ``eager``/``triton``), only when needed.
    """
    device = torch.device(device)
    if why := run_status(backend, str(device)):
        raise BackendError(f"backend {backend} cannot run on {device} here: {why}")
    if backend in ARTIFACT_BACKENDS:
        path = Path(directory) / ARTIFACT_FILES[backend]
        if not path.is_file():
            raise BackendError(f"{directory}: {ARTIFACT_FILES[backend]} is missing")
        if backend == "onnxruntime":
            return OnnxRuntimeRunner(path, config, device, threads)
        if backend == "aoti":
            return AOTIRunner(path, device)
        return TensorRTRunner(path, config, device)
    if reference is None:
        raise BackendError(f"backend {backend} needs the reference weights")
    if backend == "eager" and not precision.dtype.is_floating_point:
        raise BackendError(f"the eager backend runs fp32, bf16 or fp16, not {precision.name}")
    model = reference()
    if backend == "eager":
        return TorchRunner(ServingModel(model, precision).to(device), device, thread_safe=True)
    try:
        from stvfm_engine.engine.triton_backend import load_triton_backend

        fn = load_triton_backend(model, precision=precision.name, device=str(device))
    except STVFMError:
        raise
    except Exception as e:  # the Triton path may fail in many ways (no GPU, no interpreter, unsupported op)
        raise BackendError(f"the triton backend cannot load on {device}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    return TorchRunner(fn, device, thread_safe=False)

