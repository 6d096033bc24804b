"""Micro-benchmark: the gateway's per-request parse + validation cost on the hot path.

    PYTHONPATH=. python loadtests/validation_bench.py [--repeat 5] [--number 20000]

Times `parse_request` + `validate_against` (everything the data plane does to a body before the
upstream call) for JSON and binary-extension requests of 1 and 64 fraud rows (8 FP32 features),
and prints the best-of-`repeat` CPU microseconds per request (process CPU time, so other load on
a shared machine inflates it less than wall time). Run it on two trees (e.g. main and a branch,
via PYTHONPATH) to compare, alternating, and take the best of several runs.
"""

from __future__ import annotations

import argparse
import random
import time
import timeit

import numpy as np
import orjson

from gateway.dataplane.protocol import TensorSpec, parse_request, validate_against

SPECS = (TensorSpec("features", "FP32", (-1, 8)),)


def json_body(rows: int, nested: bool) -> bytes:
    rng = random.Random(rows)
    data = [[rng.random() for _ in range(8)] for _ in range(rows)]
    return orjson.dumps({"id": f"req-{rows}", "inputs": [{
        "name": "features", "datatype": "FP32", "shape": [rows, 8],
        "data": data if nested else [x for row in data for x in row]}]})


def binary_body(rows: int) -> tuple[bytes, str]:
    x = np.random.default_rng(rows).random((rows, 8), dtype=np.float32)
    header = orjson.dumps({"id": f"req-{rows}", "inputs": [{
        "name": "features", "datatype": "FP32", "shape": [rows, 8],
        "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "score", "parameters": {"binary_data": True}}]})
    return header + x.tobytes(), str(len(header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()
    cases: dict[str, tuple[bytes, str | None]] = {
        "json 1x8 flat": (json_body(1, False), None),
        "json 64x8 flat": (json_body(64, False), None),
        "json 64x8 nested": (json_body(64, True), None),
        "binary 1x8": binary_body(1),
        "binary 64x8": binary_body(64),
    }
    for name, (body, length) in cases.items():
        def run(body: bytes = body, length: str | None = length) -> None:
            validate_against(parse_request(body, length), "m", SPECS)

        number = args.number if "64" not in name or "binary" in name else args.number // 8
        best = min(timeit.repeat(run, number=number, repeat=args.repeat,
                                 timer=time.process_time)) / number
        print(f"{name:18s} {best * 1e6:7.2f} us/request  ({len(body)} bytes)")


if __name__ == "__main__":
    main()
