"""The gateway image's default config (deploy/image/gateway.yaml, its /etc/understudy/gateway.yaml)
serves as the image would run it: `python -m gateway serve` from the image's working directory,
configured by environment only, no routes until one is created through the admin API, which then
serves real Triton and logs under the working directory.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import fraud_body, read_stream
from tests.integration.test_deploy import DEPLOY
from understudy_demo.run import wait_http
from understudy_demo.triton import free_port

pytestmark = pytest.mark.triton

IMAGE_CONFIG = DEPLOY / "image" / "gateway.yaml"


async def test_image_default_config_serves_routes_created_through_the_admin_api(
        triton, tmp_path: Path) -> None:
    port, token = free_port(), secrets.token_urlsafe(32)
    env = {**os.environ, "UNDERSTUDY_TRITON_URL": triton.url,
           "UNDERSTUDY_LISTEN_HOST": "127.0.0.1", "UNDERSTUDY_LISTEN_PORT": str(port),
           "UNDERSTUDY_LISTEN_GRPC_PORT": str(free_port()), "UNDERSTUDY_ADMIN_TOKEN": token}
    with open(tmp_path / "gateway.log", "wb") as log_file:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited here
            [sys.executable, "-m", "gateway", "serve", "--config", str(IMAGE_CONFIG)],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        await wait_http(f"{base}/v2/health/live")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/admin/routes", headers=auth) as resp:
                assert resp.status == 200
                assert (await resp.json())["routes"] == []
            async with session.post(f"{base}/v2/models/fraud/infer",
                                    data=orjson.dumps(fraud_body([[0.1] * 8], "before"))) as resp:
                assert resp.status == 404  # no demo route in the image
            async with session.put(f"{base}/admin/routes/fraud", headers=auth,
                                   json={"champion": {"model": "fraud_v3"}}) as resp:
                assert resp.status == 201, await resp.text()
            async with session.post(f"{base}/v2/models/fraud/infer",
                                    data=orjson.dumps(fraud_body([[0.1] * 8], "after"))) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Served-Model"].startswith("fraud_v3")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, (tmp_path / "gateway.log").read_text()[-2000:]
    # Relative paths resolve under the working directory (the image's /var/lib/understudy).
    assert [r["request_id"] for r in read_stream(tmp_path / "var" / "log", "inferences")] == [
        "after"]
    assert (tmp_path / "var" / "state" / "registry.json").is_file()
