"""Triton Python-backend model running an stvfm-engine ``Engine``: the ``model.py`` of every model that
``serve`` or ``export-triton --platform python`` writes. One response per request: a bad one gets an
INVALID_ARG error, the others of its batch their forecasts (Triton has checked dtypes and shapes).

A multi-model engine directory is served as one model per name that runs only its own parts, plus
one backbone model (``role`` = ``backbone``, one instance) that holds the shared backbone: each
model's backbone pass is a BLS request to it, and Triton's dynamic batcher joins the passes of
different models whose token tensors have the same shape into one execution."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from stvfm_engine.engine.graph import FEATURES_NAME, TOKENS_NAME
from stvfm_engine.errors import ServeError, StoreError, STVFMError, first_line
from stvfm_engine.serving.models import open_engine, open_stream_worker, open_worker


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.backbone_role = params.get("role") == "backbone"
        if self.backbone_role:
            self.engine = open_engine(params, base=version_dir)
            return
        self.streams = open_stream_worker(params, base=version_dir) if params.get("role") == "stream" else None
        self.worker = self.streams.worker if self.streams is not None else open_worker(params, base=version_dir)
        self.inputs = [t["name"] for t in config["input"]]
        if params.get("backbone_model"):
            timeout_us = int(params.get("backbone_timeout_us") or 0)
            self.worker.session.share_backbone(_bls(params["backbone_model"], timeout_us))
        # ready means warm: serve's warm-up sends a companion the WARM_UP_STREAM request (warmed in execute,
        # where a multi-model directory's shared backbone can be called: BLS is not allowed in initialize)

    def execute(self, requests):
        if self.backbone_role:
            return _run_backbone(self.engine, requests)
        if self.streams is not None:
            return self._execute_streams(requests)
        # (x, tod, dow) per request; a model without time inputs has x only
        arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        return [_response(result, {"y": result}) for result in
                self.worker.answer([(None, *a, *(None,) * (3 - len(a))) for a in arrays])]

    def _execute_streams(self, requests):
        """The ``M_stream`` companion: optional inputs absent from a request are None."""
        arrays = []
        for r in requests:
            found = {}
            for n in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(r, n)
                if tensor is not None:
                    found[n] = tensor.as_numpy()
            arrays.append((None, found))
        return [_response(result, result) for result in self.streams.answer(arrays)]

    def finalize(self):
        if getattr(self, "streams", None) is not None:
            self.streams.close()


def _response(result, outputs):
    """An InferenceResponse of ``outputs`` ({name: array}), or of the error ``result`` is: INVALID_ARG (400) for
    what the request sent, UNAVAILABLE (503) for a part of the server that is down (the shared backbone's
    worker, the stream store), INTERNAL otherwise."""
    if isinstance(result, (ServeError, StoreError)):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), pb_utils.TritonError.UNAVAILABLE))
    if isinstance(result, Exception):
        code = pb_utils.TritonError.INVALID_ARG if isinstance(result, STVFMError) else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code))
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, array) for name, array in outputs.items()])


def _bls(model_name, timeout_us=0):
    """The backbone pass of a model's worker: a BLS request to the shared backbone model, given up (an
    error for the requests of this batch) after ``timeout_us`` (0: no limit)."""
    extra = {"timeout": timeout_us} if timeout_us else {}

    def backbone(tokens: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=[FEATURES_NAME],
                                            inputs=[pb_utils.Tensor(TOKENS_NAME, np.ascontiguousarray(tokens))],
                                            **extra)
        response = request.exec()
        if response.has_error():
            raise ServeError(f"shared backbone {model_name} unavailable: {response.error().message()}")
        # a copy: the array may live in the response's shared memory, freed with the response
        return np.array(pb_utils.get_output_tensor_by_name(response, FEATURES_NAME).as_numpy(), copy=True)
    return backbone


def _run_backbone(engine, requests):
    """One backbone call per token shape among the requests Triton batched together."""
    tokens = [pb_utils.get_input_tensor_by_name(r, TOKENS_NAME).as_numpy() for r in requests]
    groups = {}
    for i, t in enumerate(tokens):
        groups.setdefault(t.shape[1:], []).append(i)
    responses = [None] * len(requests)
    for members in groups.values():
        try:
            h = engine.run_backbone(np.concatenate([tokens[i] for i in members]))
        except Exception as e:  # noqa: BLE001 - every request of this call gets the error
            for i in members:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(first_line(e)))
            continue
        start = 0
        for i in members:
            n = len(tokens[i])
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(FEATURES_NAME, h[start:start + n])])
            start += n
    return responses
