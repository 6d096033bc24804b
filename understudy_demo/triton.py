"""Run the real `tritonserver` from the nvidia-pytriton wheel against plain model repositories.

The wheel ships Triton 2.51 and its Python backend but is meant to be driven by PyTriton; here we
lay it out as a normal Triton install (once, in a cache dir) and start the binary ourselves, CPU
only, so tests, the demo and load tests talk to the same server production would run.

Things the wheel does not do for us, and why they are here:
- the Python backend stub for this interpreter's version must sit in `backends/python/`;
- the stub embeds libpython, so `LD_LIBRARY_PATH` must hold this interpreter's LIBDIR (else it
  loads the OS libpython and fails) and the wheel's bundled libs;
- the embedded interpreter ignores PYTHONPATH and finds its prefix via `python3` on PATH, so
  PATH must start with this interpreter's bin dir or the models cannot import the venv's numpy;
- the stubs are child processes of tritonserver: it runs in its own process group, and stop()
  waits for the whole group to be gone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
STUB_NAME = "triton_python_backend_stub"
_COMPLETE_MARKER = ".understudy-complete"
_BIND_ERRORS = (
    "already in use",
    "failed to start http",
    "failed to start grpc",
    "failed to start metrics",
)


class TritonStartupError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with the tail of its log."""


def pytriton_root() -> Path:
    """The installed `pytriton` package directory (found without importing it: it is heavy)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise RuntimeError("nvidia-pytriton is not installed: pip install 'understudy[triton]'")
    return Path(spec.origin).parent


def pytriton_version() -> str:
    """Version of the installed nvidia-pytriton wheel (part of the cache key)."""
    return importlib.metadata.version("nvidia-pytriton")


def wheel_libs_dir() -> Path:
    """The wheel's bundled shared libraries (libtritonserver, libcudart, ...)."""
    return pytriton_root().parent / "nvidia_pytriton.libs"


def default_cache_dir() -> Path:
    """~/.cache/understudy/tritonserver-<pytriton version>-py3.X (honours XDG_CACHE_HOME)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "understudy" / f"tritonserver-{pytriton_version()}-py{PY_VERSION}"


def _is_complete(server_dir: Path) -> bool:
    return (
        (server_dir / _COMPLETE_MARKER).is_file()
        and (server_dir / "bin" / "tritonserver").is_file()
        and (server_dir / "backends" / "python" / STUB_NAME).is_file()
    )


def prepare_server_dir(cache_dir: Path | None = None) -> Path:
    """Lay out a Triton install (bin/, backends/python/ with this Python's stub) in cache_dir.

    Idempotent and race-safe: the copy is built in a temporary sibling directory and renamed into
    place; a process that loses the rename race uses the winner's copy.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _is_complete(target):
        return target
    source = pytriton_root() / "tritonserver"
    stub = source / "python_backend_stubs" / PY_VERSION / STUB_NAME
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton {pytriton_version()} has no stub for {PY_VERSION}")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build = tmp / "server"
        shutil.copytree(
            source, build, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__")
        )
        shutil.copy2(stub, build / "backends" / "python" / STUB_NAME)
        (build / _COMPLETE_MARKER).write_text(f"{pytriton_version()} py{PY_VERSION}\n")
        if target.exists() and not _is_complete(target):
            # A broken leftover (not ours to trust): move it aside so the rename can succeed.
            with contextlib.suppress(OSError):
                target.rename(tmp / "stale")
        try:
            build.rename(target)
        except OSError:
            if not _is_complete(target):  # lost the race to someone who also failed
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on host:port.

    Triton binds with SO_REUSEPORT, so a second tritonserver on a busy port starts "fine" and
    the kernel splits connections between the two: check before launching instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python backend stubs, from the running interpreter."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    lib_paths = [libdir, str(wheel_libs_dir())]
    env["LD_LIBRARY_PATH"] = _join_paths(lib_paths, env.get("LD_LIBRARY_PATH"))
    # The stub embeds libpython with an isolated config (PYTHONPATH & co. are ignored) and finds
    # its prefix by looking up `python3` on PATH: put this interpreter's bin dir first so that
    # it lands in our venv (pyvenv.cfg) and `import numpy` in model.py finds the venv's numpy.
    env["PATH"] = _join_paths([str(Path(sys.executable).parent)], env.get("PATH"))
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def _join_paths(first: Iterable[str], existing: str | None) -> str:
    seen: list[str] = []
    for part in [*first, *(existing or "").split(os.pathsep)]:
        if part and part not in seen:
            seen.append(part)
    return os.pathsep.join(seen)


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, [state, ppid, pgrp, ...]) for every process in /proc (gone ones skipped)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." — comm may contain spaces and parentheses.
        yield int(entry.name), stat[stat.rfind(")") + 2 :].split()


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in a process group, read from /proc."""
    return [pid for pid, fields in proc_stats()
            if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid]


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (no orphans)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class TritonServer:
    """One tritonserver process serving plain model repositories on CPU.

    Ports left as None are picked free (and re-picked if taken meanwhile); fixed ports must be
    free. Use as a context manager, or call start() and stop(). The log (stdout and stderr of
    Triton and of the Python models) goes to `log_file` (a temporary file if not given).
    `die_with_parent` makes Linux SIGTERM Triton if the starting *thread* dies: start it from a
    long-lived thread (the main one), or pass False.
    """

    def __init__(
        self,
        model_repositories: Sequence[Path | str],
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_file: Path | str | None = None,
        server_dir: Path | None = None,
        exit_timeout: float = 5.0,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = True,
    ) -> None:
        if not model_repositories:
            raise ValueError("at least one model repository is required")
        self.model_repositories = [Path(p).resolve() for p in model_repositories]
        for repo in self.model_repositories:
            if not repo.is_dir():
                raise FileNotFoundError(f"model repository {repo} does not exist")
        self.host = host
        self._fixed_ports = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = self._pick_ports()
        if log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_file = name
        self.log_file = Path(log_file)
        self.server_dir = server_dir
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.die_with_parent = die_with_parent
        self.startup_seconds: float | None = None
        self._shm_prefix = f"understudy_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- addresses -------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        """Base URL of the KServe V2 HTTP endpoint, e.g. http://127.0.0.1:8000."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def url(self) -> str:
        """Alias of http_url (what tests and the gateway config want)."""
        return self.http_url

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint (tritonclient.grpc takes no scheme)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Triton's own Prometheus metrics."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """tritonserver's pid (also its process group id), or None when not running."""
        return self._proc.pid if self._proc is not None else None

    # --- lifecycle -------------------------------------------------------------------------

    def command(self, server_dir: Path) -> list[str]:
        """The tritonserver command line."""
        cmd = [str(server_dir / "bin" / "tritonserver")]
        cmd += [f"--model-repository={repo}" for repo in self.model_repositories]
        cmd += [
            f"--backend-directory={server_dir / 'backends'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--disable-auto-complete-config",  # configs are complete: Triton must not guess
            f"--exit-timeout-secs={max(1, round(self.exit_timeout))}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        return cmd

    def start(self, timeout: float = 120.0, attempts: int = 3) -> Self:
        """Start tritonserver and wait until it is ready; returns self.

        With auto-picked ports a lost bind race is retried on fresh ports, up to `attempts`.
        """
        if self.running:
            return self
        server_dir = self.server_dir or prepare_server_dir()
        began = time.monotonic()
        for attempt in range(1, attempts + 1):
            self._check_ports()
            self._launch(server_dir)
            try:
                self.wait_ready(timeout)
            except TritonStartupError as exc:
                self.stop()
                retry = attempt < attempts and None in self._fixed_ports
                if retry and any(s in str(exc).lower() for s in _BIND_ERRORS):
                    self.http_port, self.grpc_port, self.metrics_port = self._pick_ports()
                    continue
                raise
            break
        self.startup_seconds = time.monotonic() - began
        return self

    def _pick_ports(self) -> tuple[int, int, int]:
        picked: list[int] = []
        for fixed in self._fixed_ports:
            port = fixed if fixed else free_port(self.host)
            while port in picked:
                port = free_port(self.host)
            picked.append(port)
        return picked[0], picked[1], picked[2]

    def _check_ports(self) -> None:
        """Re-pick auto ports that got taken; refuse fixed ports that are busy."""
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        for k, fixed in enumerate(self._fixed_ports):
            while not port_is_free(ports[k], self.host):
                if fixed:
                    raise TritonStartupError(f"port {self.host}:{fixed} is already in use")
                ports[k] = free_port(self.host)
        self.http_port, self.grpc_port, self.metrics_port = ports

    def _launch(self, server_dir: Path) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_file.open("wb")
        self._proc = subprocess.Popen(
            self.command(server_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=server_env(),
            cwd=server_dir,
            start_new_session=True,  # own process group: stop() can reach the backend stubs
            preexec_fn=_die_with_parent() if self.die_with_parent else None,
        )
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll /v2/health/ready until 200; returns seconds waited.

        Raises TritonStartupError (with the log tail) if the process exits or time runs out.
        """
        if self._proc is None:
            raise TritonStartupError("tritonserver was not started")
        began = time.monotonic()
        deadline = began + timeout
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise TritonStartupError(
                    f"tritonserver exited with code {code} before becoming ready "
                    f"(log: {self.log_file}):\n{self.log_tail()}"
                )
            if _http_status(url) == 200:
                return time.monotonic() - began
            if time.monotonic() > deadline:
                raise TritonStartupError(
                    f"tritonserver not ready at {url} after {timeout:.0f}s "
                    f"(log: {self.log_file}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; returns the exit code.

        Returns only once no process of the group (tritonserver and its stubs) is left.
        """
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return None
        grace = self.exit_timeout + 5.0 if grace is None else grace
        pgid = proc.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            code: int | None = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            code = proc.wait()
        # Stubs notice their parent is gone within ~1 s; do not wait on them longer than that.
        deadline = time.monotonic() + 2.0
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while process_group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._remove_shared_memory()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def _remove_shared_memory(self) -> None:
        """Delete the Python backend's /dev/shm regions a killed server could leave behind."""
        shm = Path("/dev/shm")  # noqa: S108 - where the Python backend puts its regions
        if shm.is_dir():
            for region in shm.glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- introspection ---------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Triton's log, for error messages."""
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16_384))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unavailable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def models(self) -> list[dict[str, Any]]:
        """Triton's repository index: [{"name", "version", "state", ...}, ...]."""
        req = urllib.request.Request(  # noqa: S310 - our own http:// URL
            f"{self.http_url}/v2/repository/index", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            index: list[dict[str, Any]] = json.loads(resp.read())
        return index

    def process_ids(self) -> list[int]:
        """pids of tritonserver and its backend stubs (its process group)."""
        return process_group_members(self._proc.pid) if self._proc is not None else []


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - http:// we built
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError, http.client.HTTPException):
        # HTTPException: something that is not an HTTP/1.1 server holds the port (another
        # session's gRPC listener took it first answers with HTTP/2 bytes: BadStatusLine).
        # Not Triton: it will fail to bind and start() re-picks the port.
        return None


def main(
    model_repositories: Sequence[Path | str],
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    log_file: Path | str | None = None,
) -> int:
    """`python -m gateway triton`: serve until Ctrl-C or SIGTERM, then stop cleanly.

    Returns 0 on a requested shutdown, 1 if Triton fails to start or dies on its own.
    """
    server = TritonServer(
        model_repositories,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        host=host,
        log_file=log_file,
    )
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except TritonStartupError as exc:
            print(f"triton: {exc}", file=sys.stderr)
            return 1
        print(f"triton ready in {server.startup_seconds:.1f}s (log: {server.log_file})")
        print(f"  HTTP     {server.http_url}")
        print(f"  gRPC     {server.grpc_url}")
        print(f"  metrics  {server.metrics_url}")
        for model in server.models():
            state = model.get("state", "?")
            print(f"  model    {model['name']} v{model.get('version', '?')} {state}")
        sys.stdout.flush()
        while not stop_requested.wait(0.5):
            if not server.running:
                print(
                    f"triton: tritonserver exited on its own:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                server.stop()
                return 1
        print("triton: stopping")
        server.stop()
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
