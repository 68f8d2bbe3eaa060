"""Triton Python-backend model that runs an stvfm-engine ``Engine``: copied as ``model.py`` into every
model of a repository that ``serve`` or ``export-triton --platform python`` writes.

Triton checks each request's dtypes, shapes and batch size against config.pbtxt before it joins a
batch; ``execute`` then validates each request's values on its own (finite ``x``, ``tod``/``dow`` in
range) and answers a bad one with an INVALID_ARG error while the others of the batch get their forecasts.
"""
import json

import triton_python_backend_utils as pb_utils

from stvfm_engine.errors import InputError
from stvfm_engine.serving.models import open_runner


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.runner = open_runner(params, base=version_dir)
        self.inputs = [t["name"] for t in config["input"]]

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        responses = []
        for result in self.runner.run([(a + [None, None])[:3] for a in arrays]):
            if isinstance(result, InputError):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            elif isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", result)]))
        return responses
