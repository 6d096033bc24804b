"""Test-only model with one input per datatype family (tests/integration/test_fuzz_typed.py).

Echoes `f32` and `s` back (so non-finite floats and arbitrary strings travel through Triton's
answer into the log) and counts all input elements in `n`.
"""

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS = ("f32", "f64", "i8", "u16", "i64", "u64", "b", "s")


class TritonPythonModel:
    """Triton Python-backend entry point."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: the echoes and the element count."""
        responses = []
        for request in requests:
            arrays = {k: pb_utils.get_input_tensor_by_name(request, k).as_numpy() for k in INPUTS}
            count = sum(a.size for a in arrays.values())
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("f32_out", arrays["f32"].astype(np.float32)),
                pb_utils.Tensor("s_out", arrays["s"].astype(np.object_)),
                pb_utils.Tensor("n", np.array([count], dtype=np.int64)),
            ]))
        return responses
