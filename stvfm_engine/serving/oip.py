"""The Open Inference Protocol (KServe v2) over HTTP, for servers that are not Triton (the Ray Serve app):
JSON tensors and Triton's binary tensor extension, as ``tritonclient.http`` sends and reads them."""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from stvfm_engine.errors import ServeError
from stvfm_engine.serving.models import ServedModel

HEADER_LENGTH = "inference-header-content-length"
DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPES = {np.dtype(v): k for k, v in DTYPES.items()}


class ProtocolError(ServeError):
    """A request that is not a valid inference request for the model (answered with HTTP 400)."""


def model_metadata(model: ServedModel, platform: str) -> dict[str, Any]:
    """``GET /v2/models/{name}``: shapes with ``-1`` for the batch axis, as Triton reports them."""
    io = model.io()
    return {"name": model.name, "versions": ["1"], "platform": platform,
            **{side: [{"name": t["name"], "datatype": t["datatype"], "shape": [-1, *t["dims"]]} for t in io[side]]
               for side in ("inputs", "outputs")}}


def decode_request(model: ServedModel, body: bytes, header_length: Optional[str]) -> tuple[dict[str, np.ndarray], bool]:
    """The input arrays of an infer request checked against ``model``'s names and datatypes, and
    whether the client asked for binary outputs."""
    try:
        n = len(body) if header_length is None else int(header_length)
        request = json.loads(body[:n])
        expected = {t["name"]: t["datatype"] for t in model.io()["inputs"]}
        binary, offset, arrays = memoryview(body)[n:], 0, {}
        for tensor in request["inputs"]:
            name, datatype, shape = tensor["name"], tensor["datatype"], [int(s) for s in tensor["shape"]]
            if name not in expected:
                raise ProtocolError(f"unexpected input {name!r} for model {model.name!r}; expected {list(expected)}")
            if datatype != expected[name]:
                raise ProtocolError(f"expected input {name!r} {expected[name]}, got {datatype}")
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None:
                arrays[name] = np.asarray(tensor["data"], dtype=DTYPES[datatype]).reshape(shape)
            else:
                arrays[name] = np.frombuffer(binary[offset:offset + int(size)], dtype=DTYPES[datatype]).reshape(shape)
                offset += int(size)
    except ProtocolError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ProtocolError(f"not a valid inference request ({type(e).__name__}: {e})") from None
    if missing := [name for name in expected if name not in arrays]:
        raise ProtocolError(f"missing input(s) {missing} for model {model.name!r}")
    parameters = request.get("parameters") or {}
    outputs = request.get("outputs") or []
    binary_out = bool(parameters.get("binary_data_output")) or any(
        (o.get("parameters") or {}).get("binary_data") for o in outputs)
    return arrays, binary_out


def encode_response(model: ServedModel, outputs: dict[str, np.ndarray], binary: bool) -> tuple[bytes, dict[str, str]]:
    """An infer response body and its headers (binary tensors after the JSON when ``binary``)."""
    tensors, blobs = [], []
    for name, array in outputs.items():
        tensor = {"name": name, "datatype": DATATYPES[array.dtype], "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    head = json.dumps({"model_name": model.name, "model_version": "1", "outputs": tensors}).encode()
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers[HEADER_LENGTH] = str(len(head))
    return head + b"".join(blobs), headers
