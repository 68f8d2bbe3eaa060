"""The Open Inference Protocol decoder's two parses agree: where pysimdjson is installed, a tensor's flat
``data`` array goes from simdjson's buffer into the array (``oip._parse``); without it, orjson gives Python
values that the strict checks walk. Whatever the body (valid, nested, wrongly typed values, out-of-range
integers, repeated keys, '[' in strings, broken JSON), both give the same arrays bit for bit or the same
one-line error. No engine: a stand-in model with float, integer, BOOL and BYTES inputs."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from stvfm_engine.errors import ProtocolError
from stvfm_engine.serving import oip

pytest.importorskip("orjson", reason="the serve extra is not installed: pip install 'stvfm-engine[serve]'")
hypothesis = pytest.importorskip("hypothesis", reason="the test extra is not installed")
simdjson = pytest.importorskip("simdjson", reason="pysimdjson (the serve extra) is not installed: "
                                                  "pip install 'stvfm-engine[serve]'")
st = hypothesis.strategies

INPUTS = {"x": ("FP32", [3, 2, 5]), "t": ("INT64", [3]), "h": ("FP16", [2]), "d": ("FP64", [1]),
          "i": ("INT32", [2]), "b": ("BOOL", [1]), "s": ("BYTES", [1])}


class Model:
    """What the decoder reads of a served model."""

    name, max_batch = "m", 4

    def io(self):
        return {"inputs": [{"name": n, "datatype": d, "dims": dims, "optional": n != "x"}
                           for n, (d, dims) in INPUTS.items()],
                "outputs": [{"name": "y", "datatype": "FP32", "dims": [2]}]}


def _decode(body: bytes, fast: bool):
    saved = oip.simdjson
    oip.simdjson = simdjson if fast else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float32 overflow: inf on both paths
            arrays, binary = oip.decode_request(Model(), body, None)
        return "ok", {k: (v.dtype.str, v.shape, v.tobytes() if v.dtype != object else list(v.ravel()))
                      for k, v in arrays.items()}, binary
    except ProtocolError as e:
        return "refused", str(e)
    finally:
        oip.simdjson = saved


def _agree(body: bytes) -> str:
    fast, slow = _decode(body, True), _decode(body, False)
    assert fast == slow, (body[:300], fast[:2] if fast[0] == "refused" else "ok",
                          slow[:2] if slow[0] == "refused" else "ok")
    return fast[0]


SCALARS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.floats(width=32, allow_nan=False,
                    allow_infinity=False), st.integers(-2 ** 65, 2 ** 65), st.booleans(), st.none(),
                    st.text(alphabet="[]1.a", max_size=3), st.just([1.5]), st.just([]))


def _values(datatype: str, n: int):
    if datatype.startswith("FP"):
        return st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False) | st.integers(-9, 9),
                        min_size=n, max_size=n)
    if datatype.startswith("INT"):
        return st.lists(st.integers(-2 ** 40, 2 ** 40), min_size=n, max_size=n)
    if datatype == "BOOL":
        return st.lists(st.booleans(), min_size=n, max_size=n)
    return st.lists(st.text(alphabet="ab[é", max_size=3), min_size=n, max_size=n)


def _nest(flat: list, shape: list[int]) -> list:
    for d in reversed(shape[1:]):
        flat = [flat[i:i + d] for i in range(0, len(flat), d)]
    return flat


@st.composite
def requests(draw):
    """A valid request, then maybe one thing made wrong or odd (a value, the nesting, a key, a string)."""
    batch = draw(st.integers(1, 2))
    names = ["x", *draw(st.lists(st.sampled_from(sorted(set(INPUTS) - {"x"})), unique=True, max_size=3))]
    tensors = []
    for name in names:
        datatype, dims = INPUTS[name]
        shape = [batch, *dims]
        data = draw(_values(datatype, math.prod(shape)))
        tensors.append({"name": name, "datatype": datatype, "shape": shape,
                        "data": _nest(data, shape) if draw(st.booleans()) and name == "t" else data})
    request = {"inputs": tensors}
    change = draw(st.sampled_from(["none", "none", "value", "nest", "drop", "id", "outputs", "shape", "dtype"]))
    x = tensors[0]["data"]
    if change == "value":
        x[draw(st.integers(0, len(x) - 1))] = draw(SCALARS)
    elif change == "nest":
        tensors[0]["data"] = draw(st.sampled_from([_nest(x, tensors[0]["shape"]), [[v] for v in x], [x[:-1], x[-1:]],
                                                   [x, []], [*x[:-1], [x[-1]]]]))
    elif change == "drop":
        tensors[0]["data"] = x[:-1]
    elif change == "id":
        request["id"] = draw(st.text(alphabet="[]{}ab", max_size=4))
    elif change == "outputs":
        request["outputs"] = [{"name": draw(st.sampled_from(["y", "y[", "z"])),
                               "parameters": {"binary_data": draw(st.sampled_from([True, False, [1], 0]))}}]
    elif change == "shape":
        tensors[0]["shape"] = draw(st.sampled_from([[batch * 30], [batch, 6, 5], [batch, 3, 2, 5.0], [[batch], 3, 2, 5]]))
    elif change == "dtype":
        tensors[0]["datatype"] = draw(st.sampled_from(["FP64", "INT64", "fp32", 3]))
    return json.dumps(request).encode()


def test_a_flat_float_tensor_takes_the_fast_path():
    """Without this, the agreement below could hold because simdjson is never used."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 2, 5],
                                   "data": np.linspace(-3, 7, 30).tolist()},
                                  {"name": "t", "datatype": "INT64", "shape": [1, 3], "data": [1, -2, 2 ** 62]}]}).encode()
    parsed = oip._parse(body)
    assert all(type(t["data"]) is oip._Numbers for t in parsed["inputs"])
    arrays, _ = oip.decode_request(Model(), body, None)
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (1, 3, 2, 5)
    np.testing.assert_array_equal(arrays["x"].ravel(), np.linspace(-3, 7, 30).astype(np.float32))
    np.testing.assert_array_equal(arrays["t"], [[1, -2, 2 ** 62]])
    # a '[' anywhere else (here in a string) sends the whole body to orjson: same answer
    odd = body.replace(b'{"inputs"', b'{"id": "[", "inputs"')
    assert type(oip._parse(odd)["inputs"][0]["data"]) is list
    assert _agree(odd) == "ok"


@pytest.mark.parametrize("text", [
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [1], "data": [%s]}]}',
    b'{"inputs": [], "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [%s]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [%s]}], "parameters": {"a": 1, "a": [2]}}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [%s, NaN]}]}',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [%s]}]} x',
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 30], "data": [%s, 1e400]}]}',
    b'{"inputs": [{"name": "\\ud800", "datatype": "FP32", "shape": [1, 30], "data": [%s]}]}',
    b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1, 3], "data": [1, 9223372036854775808, 2]}]}',
    b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1, 3], "data": [1, 18446744073709551616, 2]}]}',
    b'{"inputs": [{"name": "t", "datatype": "INT64", "shape": [1, 3], "data": [1, -0, 2.0]}]}',
    b'{"inputs": [{"name": "i", "datatype": "INT32", "shape": [1, 2], "data": [1, 2147483648]}]}',
    b'[1, 2]', b'"inputs"', b'', b'{"inputs": {"name": "x"}}', b'[' * 3000,
])
def test_repeated_keys_and_broken_json_agree(text):
    body = text.replace(b"%s", b", ".join(b"%.9g" % v for v in np.linspace(0.5, 30, 29))) if b"%s" in text else text
    _agree(body)


@hypothesis.settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(requests())
def test_simdjson_and_orjson_decode_every_body_alike(body):
    _agree(body)


@pytest.mark.parametrize("datatype, value", [("INT32", 2 ** 31), ("INT32", -2 ** 31 - 1), ("INT64", 2 ** 63),
                                             ("INT64", -2 ** 63 - 1), ("UINT8", -1), ("UINT8", 256), ("INT8", 128)])
def test_an_integer_out_of_its_datatypes_range_is_refused_not_wrapped(datatype, value):
    INPUTS["k"] = (datatype, [2])
    try:
        for fast in (True, False):
            body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 2, 5], "data": [0.5] * 30},
                                          {"name": "k", "datatype": datatype, "shape": [1, 2], "data": [1, value]}]})
            status, message = _decode(body.encode(), fast)[:2]
            # orjson reads an integer past 64 bits as a float: refused as not an integer
            assert status == "refused" and message in (f"input 'k': a value is out of range for {datatype}",
                                                       f"input 'k': expected {datatype} data as JSON integers, got "
                                                       f"a float {float(value)!r}"), message
            ok = _decode(body.replace(str(value), str(value - 1 if value > 0 else value + 1)).encode(), fast)
            assert ok[0] == "ok", ok
    finally:
        del INPUTS["k"]


def test_the_json_client_reads_an_answer_the_same_with_or_without_simdjson():
    from stvfm_engine import wire

    rng = np.random.default_rng(3)
    y = (rng.standard_normal((2, 3, 2, 5)) * 1e3).astype(np.float32)
    flat = oip.encode_response(Model(), {"y": y}, binary=False)[0]
    nested = json.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": list(y.shape),
                                      "data": y.tolist()}]}).encode()
    saved = wire._simdjson
    try:
        for body in (flat, nested):
            got = []
            for module in (simdjson, None):
                wire._simdjson = module
                got.append(wire.json_output(body))
            assert got[0].dtype == got[1].dtype == np.float32 and got[0].shape == got[1].shape == y.shape
            np.testing.assert_array_equal(got[0], y)
            np.testing.assert_array_equal(got[1], y)
        for module in (simdjson, None):
            wire._simdjson = module
            with pytest.raises(KeyError):
                wire.json_output(b'{"error": "busy"}')
    finally:
        wire._simdjson = saved
