"""Which client the gateway forwards inference calls with: measured.

Every client sends the same binary-tensor request for one fraud row to the same real Triton at
fixed concurrency. The gateway already holds the client's body bytes: with its keep-alive pool
(gateway/upstream/keepalive.py, what the gateway uses) or aiohttp it forwards them as they are; with
tritonclient it has to rebuild InferInput objects from the decoded request (numpy) and let
tritonclient encode them again, then decode the response. We report throughput and the client
process's CPU time per request (the gateway's own cost).

    .venv/bin/python loadtests/upstream_client_bench.py --requests 4000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import tritonclient.http.aio as triton_aio
from tritonclient.http import InferInput, InferRequestedOutput

from gateway.upstream.client import TritonUpstream
from understudy_demo.triton import TritonServer

MODELS = Path(__file__).resolve().parents[1] / "deploy" / "triton" / "models"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(label: str, n: int, concurrency: int, call) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await call()

    for _ in range(200):  # warm-up: connections, Triton's batcher
        await call()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    result = {"rps": n / wall, "cpu_us_per_request": cpu / n * 1e6}
    print(f"{label:<34} {result['rps']:>8.0f} req/s   {result['cpu_us_per_request']:>6.0f} "
          f"µs CPU/request (client process)")
    return result


async def main_async(url: str, n: int, concurrency: int) -> None:
    row = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    header = orjson.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8],
                                       "parameters": {"binary_data_size": 32}}],
                           "outputs": [{"name": "score", "parameters": {"binary_data": True}}]})
    body = header + row.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header)),
               "Content-Type": "application/octet-stream"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector,
                                     skip_auto_headers=("Accept-Encoding",)) as session:
        async def raw() -> None:
            async with session.post("/v2/models/fraud_v3/infer", data=body,
                                    headers=headers) as resp:
                await resp.read()

        await run("aiohttp, body forwarded as is", n, concurrency, raw)

    upstream = TritonUpstream(url, timeout_ms=5000, max_connections=concurrency)
    try:
        async def pooled() -> None:
            await upstream.infer("fraud_v3", "", body, "application/octet-stream", len(header))

        await run("gateway keep-alive pool (httptools)", n, concurrency, pooled)
    finally:
        await upstream.close()

    client = triton_aio.InferenceServerClient(url.removeprefix("http://"),
                                              conn_limit=concurrency)
    try:
        async def rebuilt() -> None:
            # What a tritonclient-based gateway must do per request: decode, rebuild, re-encode.
            parsed = orjson.loads(body[: len(header)])
            x = np.frombuffer(body[len(header):], dtype="<f4").reshape(parsed["inputs"][0]["shape"])
            inp = InferInput("features", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            result = await client.infer("fraud_v3", [inp],
                                        outputs=[InferRequestedOutput("score", binary_data=True)])
            result.as_numpy("score")

        await run("tritonclient.http.aio, re-encoded", n, concurrency, rebuilt)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--triton-url", help="use a running Triton instead of starting one")
    args = parser.parse_args()
    if args.triton_url:
        asyncio.run(main_async(args.triton_url, args.requests, args.concurrency))
        return
    with TritonServer([MODELS]) as triton:
        asyncio.run(main_async(triton.url, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
