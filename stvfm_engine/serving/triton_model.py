"""Triton Python-backend model running an stvfm-engine ``Engine``: the ``model.py`` of every model that
``serve`` or ``export-triton --platform python`` writes. One response per request: a bad one gets an
INVALID_ARG error, the others of its batch their forecasts (Triton has checked dtypes and shapes)."""
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
        # (x, tod, dow) per request; a model without time inputs has x only
        arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        responses = []
        for result in self.runner.run([tuple(a) + (None,) * (3 - len(a)) for a in arrays]):
            if isinstance(result, InputError):
                error = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            elif isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result))))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", result)]))
        return responses
