"""The one Open Inference Protocol (KServe v2) HTTP decoder and encoder of the project, shared by both
servers' public HTTP fronts (``serving/front.py`` before Triton, ``serving/ray_app.py`` on Ray): JSON
tensors and Triton's binary tensor extension, as ``tritonclient.http`` sends and reads them.

It checks the wire only, strictly, and refuses anything else with a :class:`ProtocolError` (HTTP 400, or
:class:`RequestTooLarge`, HTTP 413) whose one-line message names the input at fault; the model's own
rules (shapes, ranges, finiteness) stay in ``session.check``, run once, in the model.

Public functions (stable names; both servers use them):

- ``await read_body(chunks, content_length, limit)``: the body of a request from an async iterator of
  byte chunks (Starlette's ``request.stream()``, or :func:`asgi_chunks` over an ASGI ``receive``),
  refused with :class:`RequestTooLarge` from ``Content-Length`` before anything is read, or as soon as the
  streamed bytes pass ``limit``.
- ``decode_request(model, body, header_length) -> (arrays, binary_out)``: the checked input arrays by
  name and whether the client asked for binary outputs. ``header_length`` is the
  ``Inference-Header-Content-Length`` header (:data:`HEADER_LENGTH`) or None.
- ``encode_response(model, outputs, binary) -> (body, headers)``: an infer response.
- ``model_metadata(model, platform)``: ``GET /v2/models/{name}``.
- ``error_body(message) -> bytes``: ``{"error": message}``, the body of every refusal.
- ``http_status(exc) -> int``: 413 for :class:`RequestTooLarge`, 400 for other :class:`ProtocolError`.

Wire rules: the body is one JSON object (NaN/Infinity literals, invalid UTF-8, nesting deeper than
1024 levels: 400; parsed by orjson, or by simdjson where a tensor's flat ``data`` goes straight into an
array: :func:`_parse`); ``inputs`` a non-empty list of objects, each with a known ``name``
(no repeats), the model's ``datatype``, a ``shape`` of non-negative JSON integers, and either ``data``
(flat, or nested exactly as the shape) whose length is the shape's product, or
``parameters.binary_data_size`` (the shape's bytes exactly, the blobs filling the rest of the body
exactly; a BYTES blob holds exactly the shape's elements, each a 4-byte little-endian length and its
bytes). Integer datatypes take JSON integers only (not floats, bools or strings), within range;
float datatypes take JSON numbers (not bools, strings or null); BOOL takes JSON true/false; BYTES takes
JSON strings (each element as its UTF-8 bytes). Inputs the model marks ``optional`` may be left out.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

import numpy as np
import orjson

try:  # pysimdjson (the serve extras): a flat JSON array of numbers straight into a buffer, no Python floats
    import simdjson
except ImportError:  # orjson alone: the same answers, slower on tensor data
    simdjson = None

from stvfm_engine.errors import ProtocolError, RequestTooLarge
from stvfm_engine.serving.models import ServedModel

HEADER_LENGTH = "inference-header-content-length"
DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
DATATYPES = {np.dtype(v): k for k, v in DTYPES.items()}  # an object array (of bytes) is BYTES
MAX_DEPTH = 1024  # orjson's nesting limit (flat or shape-nested tensor data is a few levels deep)
# the Python types that json.loads gives for each kind of datatype (bool is not an int here)
_JSON_TYPES = {"b": ({bool}, "JSON true/false"), "i": ({int}, "JSON integers"), "u": ({int}, "JSON integers"),
               "f": ({int, float}, "JSON numbers"), "O": ({str}, "JSON strings")}
_JSON_NAMES = {bool: "a bool", int: "an integer", float: "a float", str: "a string", type(None): "null",
               list: "a list", dict: "an object"}


def http_status(error: ProtocolError) -> int:
    """The HTTP status that answers ``error``."""
    return 413 if isinstance(error, RequestTooLarge) else 400


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def too_large(size: int, limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body of {size} bytes or more is over the limit of {limit} bytes "
                           f"({limit / 2 ** 20:g} MiB, --max-request-mb)")


def check_content_length(content_length: Optional[str], limit: int) -> Optional[int]:
    """The declared body size (None if not declared); refused before the body is read if over ``limit``."""
    if content_length is None:
        return None
    if not (content_length.isascii() and content_length.isdigit()):
        raise ProtocolError(f"Content-Length: expected a non-negative integer, got {content_length[:40]!r}")
    size = int(content_length)
    if size > limit:
        raise too_large(size, limit)
    return size


async def read_body(chunks: AsyncIterator[bytes], content_length: Optional[str], limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes: refused from ``Content-Length`` before reading, and while
    streaming (a chunked body, or one longer than it said) as soon as it passes the limit."""
    check_content_length(content_length, limit)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        parts.append(chunk)
    return b"".join(parts)


async def asgi_chunks(receive: Callable[[], Awaitable[dict]]) -> AsyncIterator[bytes]:
    """The body chunks of an ASGI HTTP request (stops at the last one, or when the client disconnects)."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        if chunk := message.get("body"):
            yield chunk
        if not message.get("more_body"):
            return


def model_metadata(model: ServedModel, platform: str) -> dict[str, Any]:
    """``GET /v2/models/{name}``: shapes with ``-1`` for the batch axis, as Triton reports them."""
    io = model.io()
    return {"name": model.name, "versions": ["1"], "platform": platform,
            **{side: [{"name": t["name"], "datatype": t["datatype"], "shape": [-1, *t["dims"]]} for t in io[side]]
               for side in ("inputs", "outputs")}}


def _loads(text: bytes) -> Any:
    """The JSON value of ``text``, parsed by orjson (about 8x faster than json on tensor data; from 3.10 it
    refuses a document nested deeper than 1024 levels instead of recursing until the stack overflows)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        if "depth" in str(e):  # "array and object recursion depth exceeded" (3.10), "depth limit exceeded" (3.13)
            raise ProtocolError(f"body: JSON nested too deeply (more than {MAX_DEPTH} levels)") from None
        raise


class _Numbers:
    """An input's ``data`` array as simdjson parsed it (:func:`_parse`: no array nested in it), read as float or
    INT64 tensor data without a Python object per value: simdjson refuses what the strict checks would
    (bools, strings, null; floats for INT64; integers out of int64's range) and :meth:`array` gives None
    for anything it does not take, which then goes through those checks as the list orjson would give."""

    __slots__ = ("data",)

    def __init__(self, data: "simdjson.Array"):
        self.data = data

    def array(self, datatype: str, shape: list[int]) -> Optional[np.ndarray]:
        dtype = np.dtype(DTYPES[datatype])
        of_type = "d" if dtype.kind == "f" else "i" if dtype == np.int64 else None
        if of_type is None or len(self.data) != math.prod(shape):
            return None
        try:
            values = np.frombuffer(self.data.as_buffer(of_type=of_type), np.float64 if of_type == "d" else np.int64)
        except (TypeError, ValueError):  # INCORRECT_TYPE, NUMBER_OUT_OF_RANGE
            return None
        # float64 -> narrower floats rounds as np.fromiter does from Python floats (values past the range: inf)
        return (values if values.dtype == dtype else values.astype(dtype)).reshape(shape)

    def as_list(self) -> list:
        return self.data.as_list()


def _parse(body: bytes) -> Any:
    """The JSON value of ``body`` as :func:`_loads` gives it, except that each ``inputs[i].data`` array is a
    :class:`_Numbers` (simdjson's parse: about 2.5x faster on tensor data than orjson and a Python float per
    value). Only where no array is nested inside a ``data`` array: the body's ``[`` bytes must be exactly the
    arrays the rest of the document holds plus one per ``data`` (any other, in a string or nested data:
    orjson parses it all, as without simdjson). Anything simdjson refuses goes to orjson, which names it."""
    request = None if simdjson is None else _parse_fast(body)
    # orjson only once simdjson's document is gone (a large body is not held twice)
    return _loads(body) if request is None else request


def _parse_fast(body: bytes) -> Optional[dict]:
    """:func:`_parse` by simdjson, or None where orjson must parse ``body``."""
    try:
        doc = simdjson.Parser().parse(body)
    except (ValueError, RuntimeError):  # not valid JSON, or too deep: orjson's message names it
        return None
    if not isinstance(doc, simdjson.Object) or _repeats(doc):
        return None  # not an object (refused the same way), or a repeated key (orjson keeps the last)
    request = {key: _py(doc[key]) for key in doc.keys() if key != "inputs"}
    brackets = _lists(request)  # every array outside the inputs
    inputs = doc["inputs"] if "inputs" in doc else None
    if isinstance(inputs, simdjson.Array):
        request["inputs"] = tensors = []
        brackets += 1
        for tensor in inputs:
            if isinstance(tensor, simdjson.Object) and not _repeats(tensor):
                t = {key: _numbers_or_py(key, tensor[key]) for key in tensor.keys()}
                brackets += sum(1 if type(v) is _Numbers else _lists(v) for v in t.values())
            else:  # not an object (refused), or a repeated key (the last one, as orjson takes it)
                t = _py(tensor)
                brackets += _lists(t)
            tensors.append(t)
    elif "inputs" in doc:
        request["inputs"] = _py(inputs)
        brackets += _lists(request["inputs"])
    if body.count(b"[") != brackets:
        return None  # an array nested in data, a repeated key, or a '[' in a string
    return request


def _repeats(obj: "simdjson.Object") -> bool:
    return isinstance(obj, simdjson.Object) and len(set(keys := list(obj.keys()))) != len(keys)


def _numbers_or_py(key: str, value: Any) -> Any:
    return _Numbers(value) if key == "data" and isinstance(value, simdjson.Array) else _py(value)


def _py(value: Any) -> Any:
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value.as_dict() if isinstance(value, simdjson.Object) else value


def _lists(value: Any) -> int:
    """How many JSON arrays ``value`` (Python objects) holds, itself included."""
    if type(value) is list:
        return 1 + sum(_lists(v) for v in value if type(v) in (list, dict))
    if type(value) is dict:
        return sum(_lists(v) for v in value.values() if type(v) in (list, dict))
    return 0


def _kind(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _field(obj: dict, key: str, types: tuple, what: str, where: str) -> Any:
    value = obj.get(key)
    if type(value) not in types:
        raise ProtocolError(f"{where}: expected '{key}' {what}, got {_kind(value)}")
    return value


def _shape(tensor: dict, where: str) -> list[int]:
    shape = _field(tensor, "shape", (list,), "a list of non-negative integers", where)
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"{where}: expected 'shape' a list of non-negative integers, got {_kind(d)} {d!r}"[:200])
    return shape


def _flatten(data: list, shape: list[int], where: str) -> tuple[list, set]:
    """``data`` flat, or nested exactly as ``shape``: its scalars in row-major order, and the set of their
    Python types (one pass over the values: the datatype check reuses it)."""
    count = math.prod(shape)
    found = set(map(type, data))
    if list not in found:
        if len(data) != count:
            raise ProtocolError(f"{where}: 'data' has {len(data)} values, shape {shape} needs {count}")
        return data, found
    level = [data]
    for depth, d in enumerate(shape):
        nested = []
        for node in level:
            if type(node) is not list or len(node) != d:
                got = f"{len(node)} values" if type(node) is list else _kind(node)
                raise ProtocolError(f"{where}: 'data' nested at depth {depth} has {got}, shape {shape} needs {d}")
            nested.extend(node)
        level = nested
    return level, set(map(type, level))


def _array(values: list, found: set, datatype: str, shape: list[int], where: str) -> np.ndarray:
    """``values`` (of the Python types ``found``) as an array of ``datatype`` and ``shape``."""
    dtype = np.dtype(DTYPES[datatype])
    allowed, what = _JSON_TYPES[dtype.kind]
    if not found <= allowed:
        bad = next(v for v in values if type(v) not in allowed)
        raise ProtocolError(f"{where}: expected {datatype} data as {what}, got {_kind(bad)} {json.dumps(bad)[:40]}")
    if dtype.kind == "O":  # BYTES: each string as its UTF-8 bytes
        out = np.empty(len(values), dtype=object)
        out[:] = [v.encode("utf-8", "surrogatepass") for v in values]
        return out.reshape(shape)
    # numpy (1.x) would wrap an integer out of a narrow type's range: the range is checked here
    if dtype.kind in "iu" and values and (min(values) < (info := np.iinfo(dtype)).min or max(values) > info.max):
        raise ProtocolError(f"{where}: a value is out of range for {datatype}")
    try:  # types and ranges are checked: fromiter converts without np.array's type inference (about 2x faster)
        return np.fromiter(values, dtype=dtype, count=len(values)).reshape(shape)
    except OverflowError:  # an integer past float64's range, in float data
        raise ProtocolError(f"{where}: a value is out of range for {datatype}") from None


def serialize_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor as Triton sends it: each element (row-major) as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in (_as_bytes(v) for v in array.ravel()))


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _bytes_elements(blob: memoryview | bytes, shape: list[int], where: str) -> np.ndarray:
    """A binary BYTES tensor (:func:`serialize_bytes`) of ``shape``: refused unless its elements fill it exactly."""
    count, elements, offset, size = math.prod(shape), [], 0, len(blob)
    while offset < size:
        if offset + 4 > size or len(elements) == count:
            break
        n = struct.unpack_from("<I", blob, offset)[0]
        if offset + 4 + n > size:
            raise ProtocolError(f"{where}: BYTES element {len(elements)} claims {n} bytes, {size - offset - 4} are left")
        elements.append(bytes(blob[offset + 4:offset + 4 + n]))
        offset += 4 + n
    if len(elements) != count or offset != size:
        raise ProtocolError(f"{where}: binary BYTES data holds {len(elements)} elements"
                            f"{' and stray bytes' if offset != size else ''}; shape {shape} needs {count}")
    out = np.empty(count, dtype=object)
    out[:] = elements
    return out.reshape(shape)


def deserialize_bytes(raw: bytes, shape: Sequence[int]) -> np.ndarray:
    """The inverse of :func:`serialize_bytes` for a tensor of ``shape`` (a server's own output: trusted)."""
    return _bytes_elements(raw, list(shape), "output")


def decode_request(model: ServedModel, body: bytes, header_length: Optional[str]) -> tuple[dict[str, np.ndarray], bool]:
    """The input arrays of an infer request checked on the wire against ``model``'s input names and
    datatypes, and whether the client asked for binary outputs (module docstring: the rules)."""
    size = len(body)
    if header_length is None:
        n = size
    elif header_length.isascii() and header_length.isdigit() and int(header_length) <= size:
        n = int(header_length)
    else:
        raise ProtocolError(f"Inference-Header-Content-Length: expected an integer in [0, {size}] "
                            f"(the body's length), got {header_length[:40]!r}")
    try:
        request = _parse(body) if header_length is None else _loads(body[:n])
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(f"body: not valid JSON ({str(e)[:120]})") from None
    if type(request) is not dict:
        raise ProtocolError(f"body: expected a JSON object, got {_kind(request)}")
    io = model.io()
    expected = {t["name"]: t["datatype"] for t in io["inputs"]}
    dims = {t["name"]: t["dims"] for t in io["inputs"]}
    tensors = _field(request, "inputs", (list,), "a list of input tensors", "body")
    binary, offset, arrays = memoryview(body)[n:], 0, {}
    for i, tensor in enumerate(tensors):
        if type(tensor) is not dict:
            raise ProtocolError(f"inputs[{i}]: expected an object, got {_kind(tensor)}")
        name = _field(tensor, "name", (str,), "a string", f"inputs[{i}]")
        where = f"input {name[:40]!r}"
        if name not in expected:
            raise ProtocolError(f"{where}: not an input of model {model.name!r}; expected {list(expected)}")
        if name in arrays:
            raise ProtocolError(f"{where}: given twice")
        datatype = _field(tensor, "datatype", (str,), "a string", where)
        if datatype != expected[name]:
            raise ProtocolError(f"{where}: expected datatype {expected[name]}, got {datatype[:20]!r}")
        shape = _shape(tensor, where)
        if datatype == "BYTES" and min(dims[name], default=0) >= 0 and \
                math.prod(shape) > (most := model.max_batch * math.prod(dims[name])):
            raise ProtocolError(f"{where}: shape {shape[:8]} holds more than the {most} elements a request of this "
                                f"model can (max batch {model.max_batch} x {dims[name]})")
        parameters = tensor.get("parameters", {})
        if type(parameters) is not dict:
            raise ProtocolError(f"{where}: expected 'parameters' an object, got {_kind(parameters)}")
        if "binary_data_size" in parameters:
            nbytes = _field(parameters, "binary_data_size", (int,), "a non-negative integer", where)
            if datatype != "BYTES" and nbytes != (need := math.prod(shape) * np.dtype(DTYPES[datatype]).itemsize):
                raise ProtocolError(f"{where}: binary_data_size {nbytes} does not match shape {shape} "
                                    f"({need} bytes of {datatype})")
            if offset + nbytes > len(binary):
                raise ProtocolError(f"{where}: binary_data_size {nbytes} runs past the end of the body "
                                    f"({len(binary) - offset} bytes left)")
            blob = binary[offset:offset + nbytes]
            arrays[name] = (_bytes_elements(blob, shape, where) if datatype == "BYTES"
                            else np.frombuffer(blob, dtype=DTYPES[datatype]).reshape(shape))
            offset += nbytes
        else:
            data = tensor.get("data")
            if type(data) is _Numbers:
                if (array := data.array(datatype, shape)) is not None:
                    arrays[name] = array
                    continue
                tensor["data"] = data.as_list()  # the checks below name what is wrong (or take what it did not)
            data = _field(tensor, "data", (list,), "a list (or parameters.binary_data_size)", where)
            arrays[name] = _array(*_flatten(data, shape, where), datatype, shape, where)
    if offset != len(binary):
        raise ProtocolError(f"body: {len(binary) - offset} bytes after the JSON header are not any input's binary data")
    if missing := [t["name"] for t in io["inputs"] if t["name"] not in arrays and not t.get("optional")]:
        raise ProtocolError(f"missing input(s) {missing} for model {model.name!r}")
    return arrays, _binary_output(request, {t["name"] for t in io["outputs"]})


def _binary_output(request: dict, names: set[str]) -> bool:
    parameters = request.get("parameters", {})
    if type(parameters) is not dict:
        raise ProtocolError(f"body: expected 'parameters' an object, got {_kind(parameters)}")
    binary = parameters.get("binary_data_output", False)
    outputs = request.get("outputs", [])
    if type(outputs) is not list:
        raise ProtocolError(f"body: expected 'outputs' a list, got {_kind(outputs)}")
    for i, output in enumerate(outputs):
        if type(output) is not dict:
            raise ProtocolError(f"outputs[{i}]: expected an object, got {_kind(output)}")
        name = _field(output, "name", (str,), "a string", f"outputs[{i}]")
        if name not in names:
            raise ProtocolError(f"outputs[{i}]: {name[:40]!r} is not an output; expected {sorted(names)}")
        params = output.get("parameters", {})
        if type(params) is not dict:
            raise ProtocolError(f"output {name!r}: expected 'parameters' an object, got {_kind(params)}")
        binary = binary or params.get("binary_data", False)
    if type(binary) is not bool:
        raise ProtocolError(f"body: expected binary_data / binary_data_output true or false, got {_kind(binary)}")
    return binary


def encode_response(model: ServedModel, outputs: dict[str, np.ndarray], binary: bool) -> tuple[bytes, dict[str, str]]:
    """An infer response body and its headers (binary tensors after the JSON when ``binary``)."""
    tensors, blobs = [], []
    for name, array in outputs.items():
        tensor = {"name": name, "datatype": DATATYPES[array.dtype], "shape": list(array.shape)}
        if binary:
            blob = serialize_bytes(array) if array.dtype == object else np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype == object:
            tensor["data"] = [_as_bytes(v).decode("utf-8", "replace") for v in array.ravel()]
        else:
            tensor["data"] = np.ascontiguousarray(array).ravel()
        tensors.append(tensor)
    head = orjson.dumps({"model_name": model.name, "model_version": "1", "outputs": tensors},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers[HEADER_LENGTH] = str(len(head))
    return head + b"".join(blobs), headers
