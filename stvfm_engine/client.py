"""Python client of ``stvfm-engine serve`` (Triton or Ray Serve): ``Client(url).predict(x, tod, dow,
model=...)`` returns the forecast as numpy, over ``tritonclient`` (HTTP, or gRPC for Triton)."""
from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np

from stvfm_engine.wire import connect, infer, infer_inputs
from stvfm_engine.errors import InputError, ServeError

_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\] ")  # Triton's prefix of a refusal


class Client:
    """A connection to a server at ``url`` (``http://HOST:PORT``, ``grpc://HOST:PORT`` or ``HOST:PORT``).

    ``predict`` raises :class:`InputError` with the server's one-line message when it refuses a request
    (wrong shape or dtype, NaN, ``tod``/``dow`` out of range, a body over the size limit) and
    :class:`ServeError` for anything else (server unreachable, unknown model, a full queue or a drain:
    503, a request past its deadline: 504, a failed inference). Not shared between threads: one per thread.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", model: Optional[str] = None, timeout_s: float = 60.0):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self._module, self._client = connect(url, timeout_s)

    def predict(self, x: Any, tod: Any = None, dow: Any = None, model: Optional[str] = None) -> np.ndarray:
        """``y`` float32 ``[B, T_out, C, H, W]`` for ``x`` ``[B, T, C, H, W]`` (sent as float32) and, for a
        model with time inputs, ``tod``/``dow`` ``[B, T]`` (sent as int64)."""
        model = model or self.model
        if model is None:
            raise ServeError("which model? pass model=NAME (to Client(...) or predict)")
        arrays = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        for name, a in (("tod", tod), ("dow", dow)):
            if a is not None:
                arrays[name] = np.ascontiguousarray(a, dtype=np.int64)
        from tritonclient.utils import InferenceServerException

        try:
            result = infer(self._module, self._client, model, infer_inputs(self._module, arrays), self.timeout_s)
        except InferenceServerException as e:
            status = str(e.status() or "")
            message = _REQUEST_ID.sub("", e.message() or str(e)).split(" NOTE: ")[0]  # Triton's advice follows NOTE
            if status in ("400", "413", "StatusCode.INVALID_ARGUMENT"):
                raise InputError(message) from None
            raise ServeError(f"{self.url} model {model!r}: {message}") from None
        return result.as_numpy("y")

    def ready(self, model: Optional[str] = None) -> bool:
        """Whether the server (and ``model``, if given) is ready."""
        try:
            return bool(self._client.is_server_ready() and (model is None or self._client.is_model_ready(model)))
        except Exception:  # unreachable or refusing: not ready
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
