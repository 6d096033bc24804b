#!/usr/bin/env python3
"""Fetch, start and stop a single-node Apache Kafka broker (KRaft) for development and tests.

    python devtools/kafka_broker.py fetch  [--version V]
    python devtools/kafka_broker.py start  [--port 9092] [--controller-port N] [--dir var/kafka]
                                         [--version V] [--fresh] [--heap 512m] [--timeout S]
                                         (--port 0: a free port; the address is printed)
    python devtools/kafka_broker.py stop   [--dir var/kafka] [--timeout S]
    python devtools/kafka_broker.py status [--dir var/kafka]

Why it looks like this:

- **Where Kafka comes from.** The only registries reachable here are package registries, so the
  broker is the Maven Central artifact `org.apache.kafka:kafka_2.13` plus its runtime
  dependencies (plus `log4j-slf4j-impl`, so the broker's SLF4J 1.7 logging goes to a file through
  log4j2), copied by the machine's Maven (`mvn dependency:copy-dependencies` on a generated pom)
  into `~/.cache/understudy/kafka-<version>/jars`, reused by every later run. That directory is
  exactly what the tarball's `libs/` holds, and the tarball's `bin/*.sh` wrappers just run
  `java -cp 'libs/*' CLASS ...`, which is what this script does.
- **Which version.** 4.1.1 by default (override with `--version` or `UNDERSTUDY_KAFKA_VERSION`):
  the 4.x line past its first patch releases. Kafka 4.0 removed old protocol versions (KIP-896),
  so aiokafka 0.14 was verified end to end against it with what the gateway uses (idempotent
  producer, acks=all, gzip/zstd, consumer group with commits, admin CreateTopics; see
  tests/integration/test_kafka_sink.py): nothing was refused, so no fallback to 3.9 was needed.
  4.4.0 (the newest served here) passed the same produce/consume/commit check.
- **Start-up time.** The JVM runs with `-XX:TieredStopAtLevel=1` (C1 only): on these 2-core
  machines that halves start-up (~9 s -> ~5 s for a restart), which is what tests wait on,
  at a throughput cost a test/dev broker does not notice. Extra flags: `KAFKA_JVM_OPTS`.
- **KRaft, single node, static quorum.** `process.roles=broker,controller` with a static
  `controller.quorum.voters=1@127.0.0.1:<controller-port>` rather than `--standalone`: a
  standalone (dynamic) quorum writes the controller's endpoint into the formatted storage, so a
  restart on another controller port would not find its own quorum; with a static voter list
  the storage is port-independent and `start` after `stop` can reuse the data on any ports.
- **Test-broker settings.** Replication factor 1 for the offsets/transaction topics,
  `min.insync.replicas=1`, `group.initial.rebalance.delay.ms=0` (consumer groups form at once),
  auto topic creation on, one partition per auto-created topic (ordering per topic is then
  total, which the spill-replay tests rely on), a small heap.
- **Ready means usable.** `start` returns only when the port accepts connections *and* a Kafka
  Metadata request (hand-encoded below, stdlib only) lists a live broker: an open port alone
  does not prove that a Kafka broker (rather than some other process) serves requests there.
- **Lifecycle state lives in the data dir** (`broker.pid`, `broker.json` with ports/version,
  `server.properties`, `logs/`, `data/`): `stop` SIGTERMs (a clean shutdown flushes logs),
  waits, and SIGKILLs after a grace period; `start` on a stopped dir restarts on its data,
  `start --fresh` wipes it first.

Importable: `fetch()`, `start()`, `stop()`, `status()` return plain values; tests use them.
Standard library only, so it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_VERSION = os.environ.get("UNDERSTUDY_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
DEFAULT_DIR = "var/kafka"
DEFAULT_PORT = 9092
NODE_ID = 1

POM_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0
                             http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>understudy.local</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="server" fileName="{log}" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
  </Loggers>
</Configuration>
"""


class BrokerError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says where to look."""


@dataclass
class BrokerState:
    """What `start` wrote to `<dir>/broker.json`: enough to reach, restart and stop it."""

    pid: int
    port: int
    controller_port: int
    version: str
    dir: str
    cluster_id: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


# --------------------------------------------------------------------------------------------
# fetch


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "understudy"


def jars_dir(version: str = DEFAULT_VERSION, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / f"kafka-{version}" / "jars"


def fetch(version: str = DEFAULT_VERSION, cache: Path | None = None, quiet: bool = True) -> Path:
    """Ensure the broker's jars are in the cache and return the jars directory.

    Idempotent and safe to call concurrently (a file lock serialises Maven runs); a finished
    copy is marked by `.complete`, so an interrupted fetch is redone, not half-used.
    """
    home = (cache or cache_root()) / f"kafka-{version}"
    jars = home / "jars"
    marker = home / ".complete"
    if marker.exists():
        return jars
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return jars
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven (mvn) is not on PATH; it is needed to fetch Kafka's jars")
        (home / "pom.xml").write_text(POM_TEMPLATE.format(version=version, log4j=LOG4J_VERSION))
        staging = home / "jars.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn, "-B", "-f", str(home / "pom.xml"),
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        if quiet:
            cmd.insert(1, "-q")
        proc = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
        if proc.returncode != 0:
            detail = (proc.stdout or "")[-4000:] + (proc.stderr or "")[-2000:] if quiet else ""
            raise BrokerError(f"mvn failed to fetch kafka_2.13:{version} ({proc.returncode})\n"
                              f"{detail}")
        if not any(staging.glob("kafka_2.13-*.jar")):
            raise BrokerError(f"mvn ran but {staging} has no kafka_2.13 jar")
        shutil.rmtree(jars, ignore_errors=True)
        staging.rename(jars)
        marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return jars


# --------------------------------------------------------------------------------------------
# readiness probe: a hand-encoded Metadata request (v4: the oldest Kafka 4.x still accepts,
# non-flexible encoding, same shape in 3.x)


def _metadata_brokers(port: int, timeout: float = 2.0) -> int:
    """Send Metadata v4 (no topics) and return how many live brokers the response lists."""
    client_id = b"understudy-broker-probe"
    body = struct.pack(">i", 0) + b"\x00"  # topics: empty array; allow_auto_topic_creation
    header = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    frame = header + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(frame)) + frame)
        size = struct.unpack(">i", _recv_exact(sock, 4))[0]
        data = _recv_exact(sock, size)
    correlation, _throttle, n_brokers = struct.unpack_from(">iii", data, 0)
    if correlation != 7:
        raise BrokerError(f"metadata probe: unexpected correlation id {correlation}")
    return n_brokers


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks.extend(chunk)
    return bytes(chunks)


def is_ready(port: int, timeout: float = 2.0) -> bool:
    """True when the broker on `port` accepts a connection and answers Metadata with itself."""
    try:
        return _metadata_brokers(port, timeout) >= 1
    except (OSError, ConnectionError, struct.error, BrokerError):
        return False


# --------------------------------------------------------------------------------------------
# start / stop / status


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _new_cluster_id() -> str:
    """A Kafka Uuid string: 16 random bytes, url-safe base64 without padding, no leading '-'."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _server_properties(directory: Path, port: int, controller_port: int) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(directory / "data"),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "min.insync.replicas": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "log.flush.interval.messages": "9223372036854775807",
        "log.retention.hours": "24",
        "log.segment.bytes": str(64 * 1024 * 1024),
        "log.cleaner.enable": "false",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("java is not on PATH (Kafka 4.x needs Java 17+)")
    return java


def _java_cmd(jars: Path, directory: Path, heap: str, main: str, *args: str) -> list[str]:
    extra = os.environ.get("KAFKA_JVM_OPTS", "").split()
    return [
        _java(),
        f"-Xmx{heap}", f"-Xms{heap}",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
        "-XX:TieredStopAtLevel=1",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={directory / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={directory / 'logs'}",
        *extra,
        "-cp", f"{jars}/*",
        main, *args,
    ]


def read_state(directory: str | Path) -> BrokerState | None:
    """What the last `start` on this dir recorded (running or not), or None."""
    directory = Path(directory).resolve()
    try:
        return BrokerState(**json.loads((directory / "broker.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


# Brokers started by this process: kept referenced so that Popen does not warn about a child it
# thinks was forgotten, and polled (reaped) through Popen so no zombie lingers after `stop`.
_children: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _release_children() -> None:
    """A broker outlives the process that started it on purpose (`broker.py stop` ends it): at
    exit, let go of the Popen handles of the ones still running instead of having Popen warn
    "subprocess ... is still running" about each of them."""
    for pid, child in list(_children.items()):
        if child.poll() is None:
            child.returncode = 0  # detached, not forgotten: Popen.__del__ only checks this
        del _children[pid]


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (ours, not yet reaped) is not alive for our purposes.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _running_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / "broker.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    # Guard against a recycled pid belonging to something else.
    return pid if b"kafka.Kafka" in cmdline else None


def status(directory: str | Path = DEFAULT_DIR) -> BrokerState | None:
    """The running broker's state for this dir, or None when none runs."""
    directory = Path(directory).resolve()
    pid = _running_pid(directory)
    state = read_state(directory)
    if pid is None or state is None:
        return None
    state.pid = pid
    return state


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start(
    directory: str | Path = DEFAULT_DIR,
    port: int | None = DEFAULT_PORT,
    controller_port: int | None = None,
    version: str = DEFAULT_VERSION,
    fresh: bool = False,
    heap: str = "512m",
    timeout: float = 90.0,
) -> BrokerState:
    """Start (or restart on its existing data) a single-node KRaft broker; return its state.

    `port=None` / `controller_port=None` pick free ports (on a restart: the previous ones when
    still free). Raises BrokerError, with the tail of the broker's log, when it does not become
    ready within `timeout` seconds; the half-started process is stopped first.
    """
    directory = Path(directory).resolve()
    running = status(directory)
    if running is not None:
        if fresh:
            stop(directory)
        else:
            return running
    jars = fetch(version)
    previous = read_state(directory)
    if fresh:
        shutil.rmtree(directory / "data", ignore_errors=True)
        shutil.rmtree(directory / "logs", ignore_errors=True)
        previous = None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "logs").mkdir(exist_ok=True)

    if port is None:
        port = previous.port if previous and _port_free(previous.port) else free_port()
    if controller_port is None:
        reuse = previous and previous.controller_port != port and _port_free(
            previous.controller_port)
        controller_port = previous.controller_port if reuse and previous else free_port()
        while controller_port == port:
            controller_port = free_port()
    for p in (port, controller_port):
        if not _port_free(p):
            raise BrokerError(f"port {p} is already in use")

    (directory / "server.properties").write_text(
        _server_properties(directory, port, controller_port))
    (directory / "log4j2.xml").write_text(
        LOG4J2_XML.format(log=directory / "logs" / "server.log"))

    meta = directory / "data" / "meta.properties"
    cluster_id = previous.cluster_id if previous and meta.exists() else _new_cluster_id()
    if not meta.exists():
        shutil.rmtree(directory / "data", ignore_errors=True)
        fmt = subprocess.run(
            _java_cmd(jars, directory, "256m", "kafka.tools.StorageTool", "format",
                      "-t", cluster_id, "-c", str(directory / "server.properties")),
            capture_output=True, text=True, check=False,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"kafka-storage format failed:\n{fmt.stdout}\n{fmt.stderr}")

    out = open(directory / "logs" / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            _java_cmd(jars, directory, heap, "kafka.Kafka", str(directory / "server.properties")),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=directory,
        )
    finally:
        out.close()
    _children[proc.pid] = proc
    (directory / "broker.pid").write_text(f"{proc.pid}\n")
    state = BrokerState(pid=proc.pid, port=port, controller_port=controller_port,
                        version=version, dir=str(directory), cluster_id=cluster_id)
    (directory / "broker.json").write_text(json.dumps(asdict(state), indent=2) + "\n")

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(
                f"kafka exited with {proc.returncode} during start-up; "
                f"{directory / 'logs'}:\n{_tail(directory / 'logs' / 'stdout.log')}\n"
                f"{_tail(directory / 'logs' / 'server.log')}")
        if is_ready(port):
            return state
        time.sleep(0.2)
    stop(directory)
    raise BrokerError(f"kafka did not become ready on port {port} within {timeout:.0f}s; "
                      f"log:\n{_tail(directory / 'logs' / 'server.log')}")


def stop(directory: str | Path = DEFAULT_DIR, timeout: float = 30.0) -> bool:
    """SIGTERM the broker of this dir, wait for a clean exit, SIGKILL after `timeout` seconds.

    Returns True when a broker was running. Data is kept: `start` on the same dir restarts.
    """
    directory = Path(directory).resolve()
    pid = _running_pid(directory)
    if pid is None:
        with contextlib.suppress(OSError):
            (directory / "broker.pid").unlink()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
    with contextlib.suppress(OSError):
        (directory / "broker.pid").unlink()
    return True


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download kafka's jars into the cache")
    p_start = sub.add_parser("start", help="start (or restart) the broker in the background")
    p_stop = sub.add_parser("stop", help="stop the broker (data is kept)")
    p_status = sub.add_parser("status", help="print the broker's state; exit 1 if not running")
    for p in (p_fetch, p_start):
        p.add_argument("--version", default=DEFAULT_VERSION)
    p_fetch.add_argument("--verbose", action="store_true", help="show Maven's output")
    for p in (p_start, p_stop, p_status):
        p.add_argument("--dir", default=DEFAULT_DIR)
    p_start.add_argument("--port", type=int, default=DEFAULT_PORT,
                         help="broker port (0: pick a free one)")
    p_start.add_argument("--controller-port", type=int, default=None,
                         help="KRaft controller port (default: the previous one, else free)")
    p_start.add_argument("--fresh", action="store_true", help="wipe the data dir first")
    p_start.add_argument("--heap", default="512m")
    p_start.add_argument("--timeout", type=float, default=90.0)
    p_stop.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    try:
        if args.command == "fetch":
            began = time.monotonic()
            if not (jars_dir(args.version).parent / ".complete").exists():
                print(f"fetching kafka_2.13:{args.version} and its dependencies with Maven...",
                      file=sys.stderr)
            jars = fetch(args.version, quiet=not args.verbose)
            print(f"{jars} ({len(list(jars.glob('*.jar')))} jars, "
                  f"{time.monotonic() - began:.1f}s)")
        elif args.command == "start":
            began = time.monotonic()
            state = start(args.dir, port=args.port or None, controller_port=args.controller_port,
                          version=args.version, fresh=args.fresh, heap=args.heap,
                          timeout=args.timeout)
            print(state.bootstrap)
            print(f"kafka {state.version} pid {state.pid} dir {state.dir} "
                  f"(ready in {time.monotonic() - began:.1f}s)", file=sys.stderr)
        elif args.command == "stop":
            print("stopped" if stop(args.dir, timeout=args.timeout) else "not running")
        else:
            state = status(args.dir)
            if state is None:
                print("not running")
                return 1
            ready = "ready" if is_ready(state.port) else "not ready"
            print(f"{state.bootstrap} pid {state.pid} kafka {state.version} {ready}")
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)


__all__ = [
    "DEFAULT_VERSION", "BrokerError", "BrokerState", "fetch", "free_port", "is_ready",
    "jars_dir", "main", "read_state", "start", "status", "stop",
]
