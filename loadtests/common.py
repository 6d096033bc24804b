"""Shared plumbing for the load tests and the benchmark: real processes, load generators, parsing.

Everything here starts real servers on 127.0.0.1 (Triton from the nvidia-pytriton wheel, the
gateway as `python -m gateway serve` subprocesses, nginx, the Kafka broker script) and drives
them with real load generators (wrk, locust). Every process started is tracked and stopped
by its own pid; nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
LOADTESTS = ROOT / "loadtests"
DEMO_MODELS = ROOT / "deploy" / "triton" / "models"
LOADTEST_MODELS = LOADTESTS / "models"
POST_LUA = LOADTESTS / "post.lua"
HOST = "127.0.0.1"


# --- ports, HTTP ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_status(url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None,
                timeout: float = 5.0) -> int | None:
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}),  # noqa: S310
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def http_json(url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}),  # noqa: S310
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def wait_http(url: str, timeout: float = 60.0, ok: Sequence[int] = (200,),
              proc: subprocess.Popen[bytes] | None = None, body: Body | None = None) -> None:
    """Until `url` answers one of `ok` (a POST of `body` if given, else a GET)."""
    data, headers = (body.data, body.headers) if body is not None else (None, None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(url, data, headers, timeout=2.0) in ok:
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready within {timeout:.0f} s")


# --- request bodies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One inference request body as a load generator sends it."""

    data: bytes
    content_type: str
    header_length: int | None = None  # binary tensor extension

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(self.header_length)
        return headers


def fraud_route(shadows: int) -> dict[str, Any]:
    """The benchmarks' route: champion fraud_v3 and the first `shadows` of fraud_v4, fraud_v5
    as shadow challengers."""
    return {"fraud": {"champion": {"model": "fraud_v3"},
                      "challengers": [{"model": m, "mode": "shadow"}
                                      for m in ["fraud_v4", "fraud_v5"][:shadows]]}}


# The end of a `sitecustomize.py` that patches the gateway (its `_patch()`) once `gateway.cli` is
# imported: the packages exist, nothing runs yet, and it is the main thread (ablate.py,
# callback_cpu.py).
PATCH_AT_GATEWAY_IMPORT = '''
class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "gateway.cli":
            sys.meta_path.remove(self)
            _patch()
        return None


sys.meta_path.insert(0, _Hook())
'''


def fraud_rows(n: int, seed: int = 7) -> tuple[Any, Any]:
    from understudy_demo.traffic import FraudTraffic

    return FraudTraffic(seed).sample(n)


def json_body(row: Any) -> Body:
    from understudy_demo.traffic import v2_infer_body

    return Body(json.dumps(v2_infer_body(row)).encode(), "application/json")


def binary_body(row: Any, input_name: str = "features", output_name: str = "score") -> Body:
    """A tritonclient-style binary request (what tritonclient.http sends by default)."""
    import numpy as np
    import tritonclient.http as httpclient

    x = np.asarray(row, dtype=np.float32)
    x = x.reshape(1, -1) if x.ndim == 1 else x  # one row, or a batch of rows [n, d]
    tensor = httpclient.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput(output_name, binary_data=True)
    data, header_length = httpclient.InferenceServerClient.generate_request_body([tensor], [out])
    return Body(bytes(data), "application/octet-stream",
                int(header_length) if header_length is not None else None)


def write_body(body: Body, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body.data)
    return path


# --- processes -----------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 grace: float = 30.0) -> None:
    """Stop one process we started (by its pid), escalating to SIGKILL after `grace` s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    from understudy_demo.triton import proc_stats

    children: dict[int, list[int]] = {}
    for child, fields in proc_stats():
        children.setdefault(int(fields[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def count_records(log_dir: Path, stream: str = "inferences") -> int:
    """Records the file sink wrote under `log_dir` (every worker's directory), one per line."""
    total = 0
    for directory in log_dir.rglob(stream):
        if directory.is_dir():
            for segment in directory.glob("*.jsonl"):
                total += segment.read_bytes().count(b"\n")
    return total


def schedstat(pids: Sequence[int]) -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) of all threads of the given processes.

    The wait is time spent runnable but not running: on a machine shared with other jobs it
    shows how much a process was starved of CPU (0 on an idle machine).
    """
    cpu = wait = 0
    for task in threads(pids):
        try:
            run, queued, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        cpu += int(run)
        wait += int(queued)
    return cpu / 1e9, wait / 1e9


def threads(pids: Sequence[int]) -> Iterator[Path]:
    """The /proc directory of every thread of the given processes (gone ones skipped)."""
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        yield from tasks


def pin(cpus: str | None) -> list[str]:
    """A `taskset -c CPUS` prefix, or nothing."""
    return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


# --- Triton --------------------------------------------------------------------------------


def prepare_model_repo(work: Path, slow_delay_s: float | None = None) -> Path:
    """A copy of the load-test-only models (fraud_slow) under `work`; returns its path."""
    repo = work / "models"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(LOADTEST_MODELS, repo, ignore=shutil.ignore_patterns("__pycache__"))
    if slow_delay_s is not None:
        set_slow_delay(repo, slow_delay_s)
    return repo


def set_slow_delay(repo: Path, seconds: float) -> None:
    """fraud_slow re-reads this file on each execute(); no reload needed."""
    path = repo / "fraud_slow" / "delay_seconds"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{seconds:.6f}\n")
    tmp.replace(path)


@contextlib.contextmanager
def triton_server(work: Path, extra_repos: Sequence[Path] = ()) -> Iterator[Any]:
    from understudy_demo.triton import TritonServer

    server = TritonServer([DEMO_MODELS, *extra_repos], log_file=work / "tritonserver.log")
    with server:
        yield server


# --- the gateway ---------------------------------------------------------------------------


def gateway_config(triton_url: str, work: Path, name: str, routes: Mapping[str, Any], *,
                   sink: str = "file", kafka_bootstrap: str | None = None,
                   timeout_ms: int = 2000, extra_log: Mapping[str, Any] | None = None,
                   extra_triton: Mapping[str, Any] | None = None) -> Path:
    """Write a gateway YAML config under `work` and return its path. The gateway's registry
    state starts empty: a registry left by an earlier run under the same `work` and `name`
    would override these routes (the registry is the source of truth for routes it knows),
    e.g. another tree's defaults materialised into it."""
    state = work / f"state-{name}"
    shutil.rmtree(state, ignore_errors=True)
    log: dict[str, Any] = {"sink": sink, "path": str(work / f"log-{name}")}
    if kafka_bootstrap:
        # topics of their own per config: runs sharing a broker must not share state
        log["kafka"] = {"bootstrap": kafka_bootstrap,
                        "topic": f"understudy.bench.{name}.inferences",
                        "labels_topic": f"understudy.bench.{name}.labels",
                        "audit_topic": f"understudy.bench.{name}.audit",
                        "registry_topic": f"understudy.bench.{name}.registry"}
    log.update(extra_log or {})
    raw = {
        "triton": {"url": triton_url, "timeout_ms": timeout_ms, **(extra_triton or {})},
        "listen": {"host": HOST, "grpc_port": 0},  # Gateway(grpc_port=...) turns gRPC on
        "log": log,
        "admin": {"state_path": str(state / "registry.json")},
        "routes": dict(routes),
    }
    path = work / f"gateway-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class Gateway:
    """`python -m gateway serve` as a subprocess."""

    config: Path
    port: int = 0
    grpc_port: int = 0  # 0: HTTP only
    workers: int = 1
    cpus: str | None = None
    log_file: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    root: Path = ROOT  # a copy of the tree here runs that copy's gateway (for prototypes)
    python: str = sys.executable  # the interpreter running it (`interpreter()` describes one)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> Gateway:
        self.port = self.port or free_port()
        # A path is taken from here: the gateway runs in its tree (no realpath: a virtualenv's
        # python is a symlink that must stay one to find its environment).
        python = os.path.abspath(self.python) if os.sep in self.python else self.python
        cmd = [*pin(self.cpus), python, "-m", "gateway", "serve", "--config",
               str(self.config), "--host", HOST, "--port", str(self.port),
               "--workers", str(self.workers)]
        if self.grpc_port:
            cmd += ["--grpc-port", str(self.grpc_port)]
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root),
                                                          env.get("PYTHONPATH")]))
        out = self.log_file.open("ab") if self.log_file else None
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT)
        finally:
            if out is not None:
                out.close()  # the child has its own descriptor
        try:
            wait_http(self.url + "/v2/health/ready", timeout, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def warm(self, route: str, body: Body, n: int = 20) -> None:
        """First requests fetch the champion's metadata and open the pools."""
        for _ in range(n):
            http_status(f"{self.url}/v2/models/{route}/infer", body.data, body.headers)

    @property
    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT if self.workers > 1 else signal.SIGTERM)
        self.proc = None

    def __enter__(self) -> Gateway:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- nginx (peer baseline) -----------------------------------------------------------------


NGINX_CONF = """\
{user}worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  keepalive_requests 1000000;
  client_body_buffer_size 64k;
  upstream up {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen {host}:{port};
    location = /mirror {{ internal; proxy_pass http://up/v2/models/{shadow}/infer;
                         proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location = /v2/models/{route}/infer {{ mirror /mirror; mirror_request_body on;
                         proxy_pass http://up/v2/models/{champion}/infer;
                         proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location = /mirror-kept {{ internal; proxy_pass http://up/v2/models/{shadow}/infer;
                         proxy_http_version 1.1; proxy_set_header Connection "";
                         proxy_store {work}/mirror-store/answer; }}
    location = /v2/models/{route}-kept/infer {{ mirror /mirror-kept; mirror_request_body on;
                         proxy_pass http://up/v2/models/{champion}/infer;
                         proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location = /v2/models/{route}-plain/infer {{
                         proxy_pass http://up/v2/models/{champion}/infer;
                         proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


@dataclass
class Nginx:
    """nginx with `mirror` in front of Triton: /v2/models/fraud/infer mirrors to the shadow;
    /v2/models/fraud-plain/infer is a plain reverse proxy (no mirror)."""

    work: Path
    upstream: str  # host:port of Triton
    champion: str = "fraud_v3"
    shadow: str = "fraud_v4"
    route: str = "fraud"
    workers: int = 1
    cpus: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.port = self.port or free_port()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "mirror-store").mkdir(exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            # Started as root, nginx's workers would run as nobody: they could not write under
            # a work directory private to root (a pytest tmp dir is 0700), and the kept-alive
            # mirror stores every answer there (proxy_store).
            user="user root;\n" if os.geteuid() == 0 else "", workers=self.workers,
            work=self.work, upstream=self.upstream, host=HOST,
            port=self.port, route=self.route, champion=self.champion, shadow=self.shadow,
        ))
        self.proc = subprocess.Popen([*pin(self.cpus), binary, "-p", str(self.work), "-c",
                                      str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.work / 'error.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return self
            time.sleep(0.1)
        raise TimeoutError("nginx did not start listening")

    def version(self) -> str:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
        return (out.stderr or out.stdout).strip().replace("nginx version: ", "")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT, grace=10)
        self.proc = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Kafka (optional) ----------------------------------------------------------------------


BROKER_SCRIPT = ROOT / "devtools" / "kafka_broker.py"
KAFKA_SINK = ROOT / "gateway" / "backends" / "kafka_sink.py"


def kafka_available() -> tuple[bool, str]:
    """Whether the Kafka sink and the broker script exist and the sink imports."""
    if not BROKER_SCRIPT.exists():
        return False, "devtools/kafka_broker.py not present"
    if not KAFKA_SINK.exists():
        return False, "gateway/backends/kafka_sink.py (KafkaSink) not present yet"
    probe = subprocess.run([sys.executable, "-c",
                            "from gateway.backends.kafka_sink import KafkaSink"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return False, f"KafkaSink does not import: {probe.stderr.strip().splitlines()[-1:]}"
    return True, ""


@dataclass
class KafkaBroker:
    directory: Path
    port: int = 0
    version: str = "?"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout: float = 120.0) -> KafkaBroker:
        self.port = self.port or free_port()
        started = subprocess.run([sys.executable, str(BROKER_SCRIPT), "start", "--port",
                                  str(self.port), "--dir", str(self.directory), "--fresh",
                                  "--timeout", str(timeout)],
                                 cwd=ROOT, check=True, capture_output=True, text=True)
        # stdout: the bootstrap; stderr: "kafka 4.1.1 pid N dir D (ready in S s)"
        words = (started.stdout + started.stderr).split()
        if "kafka" in words[:-1]:
            self.version = words[words.index("kafka") + 1]
        return self

    def stop(self) -> None:
        subprocess.run([sys.executable, str(BROKER_SCRIPT), "stop", "--dir",
                        str(self.directory)], cwd=ROOT, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kafka_count(bootstrap: str, topic: str) -> int | None:
    """Messages in a topic (sum of end offsets; the bench topics are fresh)."""
    import asyncio

    async def count() -> int:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            described = await admin.describe_topics([topic])
        finally:
            await admin.close()
        parts = [p["partition"] for t in described if t.get("topic") == topic
                 for p in t.get("partitions", [])] or [0]
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
            return int(sum(ends.values()))
        finally:
            await consumer.stop()

    try:
        return asyncio.run(count())
    except Exception:
        import traceback

        traceback.print_exc()
        return None


# --- load generators -----------------------------------------------------------------------


@dataclass
class LoadResult:
    """Throughput and latency (ms) of one load-generator run."""

    tool: str
    requests: int
    seconds: float
    rps: float
    p50: float
    p90: float
    p99: float
    errors: int = 0      # socket errors + non-2xx
    mean: float = 0.0
    max: float = 0.0
    target_rps: float | None = None
    cmd: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def wrk(url: str, body_file: Path, body: Body, *, duration: float, connections: int = 16,
        threads: int = 1, cpus: str | None = None, timeout_s: float = 5.0) -> LoadResult:
    """Closed-loop capacity run: `connections` keep-alive connections as fast as they go."""
    args = [str(body_file), body.content_type]
    if body.header_length is not None:
        args.append(str(body.header_length))
    cmd = [*pin(cpus), shutil.which("wrk") or "wrk", f"-t{threads}", f"-c{connections}",
           f"-d{max(1, round(duration))}s", f"--timeout={timeout_s:g}s", "-s", str(POST_LUA),
           url, "--", *args]
    return _run_wrk(cmd, duration)


def wrk_rate(url: str, body_file: Path, body: Body, *, rate: float, duration: float,
             connections: int = 32, cpus: str | None = None,
             timeout_s: float = 5.0) -> LoadResult:
    """Latency at a fixed offered rate (Poisson arrivals, loadtests/post.lua), one wrk thread."""
    cmd = [*pin(cpus), shutil.which("wrk") or "wrk", "-t1", f"-c{connections}",
           f"-d{max(1, round(duration))}s", f"--timeout={timeout_s:g}s", "-s", str(POST_LUA),
           url, "--", str(body_file), body.content_type,
           str(body.header_length) if body.header_length is not None else "-", f"{rate:g}"]
    result = _run_wrk(cmd, duration)
    result.target_rps = rate
    return result


@contextlib.contextmanager
def wrk_rates_at_once(urls: Sequence[str], body_file: Path, body: Body, *, rate: float,
                      duration: float, **options: Any) -> Iterator[list[LoadResult]]:
    """`wrk_rate` on every url at the same time (a thread each): the with-block runs while
    they load, and the list it gets holds their results, in url order, once it ends."""
    results: list[LoadResult | None] = [None] * len(urls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = wrk_rate(urls[i], body_file, body, rate=rate, duration=duration,
                                  **options)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    done: list[LoadResult] = []
    try:
        yield done
    finally:
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    done.extend(r for r in results if r is not None)


def _run_wrk(cmd: list[str], duration: float) -> LoadResult:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=duration + 60).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    s = json.loads(line[len("WRKJSON "):])
    secs = s["duration_us"] / 1e6
    return LoadResult(
        "wrk", s["requests"], secs, s["requests"] / secs, s["p50"] / 1000, s["p90"] / 1000,
        s["p99"] / 1000, s["errors"] + s["non2xx"], s["mean"] / 1000, s["max"] / 1000,
        cmd=" ".join(cmd),
    )


# --- environment description ---------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "memory": mem,
            "kernel": os.uname().release}


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def interpreter(python: str) -> str:
    """An interpreter's version, path and build, as far as it tells: configure's
    `--enable-optimizations` (PGO) and `--with-lto` if recorded (a distribution may apply them
    in its own build rules instead), and whether the running executable loaded libpython as a
    shared library (every call into it then goes through the PLT). CPU per request depends on
    the build as much as on the version."""
    probe = ("import sys, sysconfig as s; a = s.get_config_var('CONFIG_ARGS') or ''; "
             "maps = open('/proc/self/maps').read(); "
             "print(sys.version.split()[0], sys.executable, "
             "'(configure: ' + (' '.join(f for f in ('--enable-optimizations', '--with-lto') "
             "if f in a) or 'neither PGO nor LTO flag') + '; libpython ' + "
             "('shared' if 'libpython' in maps else 'in the executable') + ')')")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def versions(gateway_python: str | None = None) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    if gateway_python is not None:
        out["gateway's python"] = interpreter(gateway_python)
    for dist in ("aiohttp", "uvloop", "orjson", "aiokafka", "nvidia-pytriton", "locust"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "missing"
    wrk_v = tool_version(["wrk", "-v"])  # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."
    out["wrk"] = wrk_v.split(" [", 1)[0].removeprefix("wrk ").removeprefix("debian/")
    out["nginx"] = tool_version(["nginx", "-v"]).replace("nginx version: ", "")
    return out


def ratio_interval(ratios: list[float], level: float = 0.95) -> tuple[float, float]:
    """A `level` t-interval of the geometric mean of per-round ratios (log scale): how far
    the median-of-rounds statistic can be trusted, from the rounds' own spread."""
    low, high = mean_interval([math.log(r) for r in ratios], level)
    return math.exp(low), math.exp(high)


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A `level` t-interval of the mean of per-round differences (e.g. added milliseconds),
    from the rounds' own spread."""
    if len(values) < 2:
        return values[0], values[0]
    low, high = stats.t.interval(level, len(values) - 1, loc=statistics.fmean(values),
                                 scale=stats.sem(values))
    return float(low), float(high)


SHADOW_LINE = re.compile(
    r'^understudy_shadow_copies_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+-]+)$'
)


def shadow_counts(url: str) -> dict[str, dict[str, float]]:
    """understudy_shadow_copies_total by model and outcome (one worker's view)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = SHADOW_LINE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        value = float(m["value"])
        if value:
            out.setdefault(labels.get("model", "?"), {})[labels.get("outcome", "?")] = value
    return out
