"""Load-test-only challenger: fraud_v4's scores, but every execute() sleeps first.

Used by loadtests/bench.py for the "challenger 100x slower than the champion" measurement. The
delay is the `delay_seconds` parameter of config.pbtxt, unless a file `delay_seconds` sits next to
config.pbtxt: the benchmark copies this model, measures the champion's latency, and writes 100x
that into the file, which is re-read (cheaply, by mtime) on every execute().
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Triton Python-backend entry point."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        spec = json.loads((Path(__file__).parent / "weights.json").read_text())
        self.input_name: str = config["input"][0]["name"]
        self.output_name: str = config["output"][0]["name"]
        self.intercept = float(spec["intercept"])
        self.weights = np.asarray(spec["weights"], dtype=np.float64)
        self.interactions = [(int(i), int(j), float(c)) for i, j, c in spec["interactions"]]
        self.squares = [(int(i), float(d)) for i, d in spec["squares"]]
        self.logistic: bool = spec["link"] == "logistic"
        param = config.get("parameters", {}).get("delay_seconds", {}).get("string_value", "0")
        self.default_delay = float(param)
        self.delay_file = Path(args["model_repository"]) / "delay_seconds"
        self._mtime: float | None = None
        self.delay = self.default_delay

    def _current_delay(self) -> float:
        try:
            mtime = os.stat(self.delay_file).st_mtime
        except OSError:
            return self.default_delay
        if mtime != self._mtime:
            try:
                self.delay = float(self.delay_file.read_text().strip())
                self._mtime = mtime
            except (OSError, ValueError):
                return self.default_delay
        return self.delay

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.intercept + x @ self.weights
        for i, j, c in self.interactions:
            out += c * x[:, i] * x[:, j]
        for i, d in self.squares:
            out += d * x[:, i] ** 2
        if self.logistic:
            out = 1.0 / (1.0 + np.exp(-out))
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        batches = [
            pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests
        ]
        delay = self._current_delay()
        if delay > 0:
            time.sleep(delay)
        x = np.concatenate(batches).astype(np.float64)
        y = self.predict(x).astype(np.float32).reshape(-1, 1)
        offsets = np.cumsum([b.shape[0] for b in batches])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)])
            for part in np.split(y, offsets)
        ]
