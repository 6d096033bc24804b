"""A challenger that fails on a fraction of requests (hand-written for the rollout tests).

A request fails when the CRC-32 of its input bytes, mod 100, is below `fail_percent` (config
parameter, 30 by default): deterministic by input, so a test knows which requests fail and a
replayed request fails again. The others get a logistic score of the features' mean, with the
fraud models' signature (features FP32 [8] -> score FP32 [1]).
"""

import json
import zlib
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


def fails(features: np.ndarray, fail_percent: float) -> bool:
    """Whether a request with these inputs gets an error (the tests use the same rule)."""
    return zlib.crc32(np.ascontiguousarray(features, dtype=np.float32).tobytes()) % 100 \
        < fail_percent


class TritonPythonModel:
    """Triton Python-backend entry point."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = json.loads(args["model_config"]).get("parameters", {})
        self.fail_percent = float(params.get("fail_percent", {}).get("string_value", "30"))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Score or fail each request of the dynamic batch on its own."""
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            if fails(x, self.fail_percent):
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=pb_utils.TritonError("fraud_flaky: injected failure")))
                continue
            score = 1.0 / (1.0 + np.exp(-x.astype(np.float64).mean(axis=1, keepdims=True)))
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("score", score.astype(np.float32))]))
        return responses
