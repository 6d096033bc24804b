"""Ingest: restarts resume without double counting (files and a real Kafka broker), the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from evaluator import cli
from evaluator.config import ConfigError, EvaluatorConfig, load_config, parse_config
from evaluator.ingest import FileIngestor, KafkaIngestor, Progress
from evaluator.report import REPORT_SCHEMA_VERSION
from evaluator.store import IngestResult, Store
from gateway.backends.file_sink import FileSink
from tests.unit.test_eval_store import CHAL, CHAMP, T0, LogDir, inference, label


def file_config(tmp_path: Path, **source: Any) -> EvaluatorConfig:
    return parse_config({
        "source": {"path": str(tmp_path / "log"), "batch_records": 4, **source},
        "store": {"path": str(tmp_path / "store.duckdb")},
        "report": {"out": str(tmp_path / "reports")},
    }, env={})


def snapshot(store: Store) -> tuple[int, int, int, int, int]:
    s = store.join_stats("fraud")
    return s.inferences, s.duplicate_inferences, s.labels, s.duplicate_labels, s.joined


def test_file_restart_resumes_without_double_counting(tmp_path: Path) -> None:
    config = file_config(tmp_path)
    log = LogDir(tmp_path / "log")
    log.inferences(*(inference(f"r{i}", T0 + i) for i in range(10)))
    log.labels(*(label(f"r{i}", i % 2, T0 + 100) for i in range(6)), label("r0", 1, T0 + 101))
    with Store.open(config.store) as store:
        assert FileIngestor(config, store).drain() == 17
        assert snapshot(store) == (10, 0, 7, 1, 6)

    # Restart: nothing new is read; then more arrives, including a re-delivered record and a
    # record still being written (no newline yet).
    with Store.open(config.store) as store:
        assert FileIngestor(config, store).drain() == 0
        assert snapshot(store) == (10, 0, 7, 1, 6)
    log.inferences(inference("r3", T0 + 3), inference("r10", T0 + 10))
    partial = orjson.dumps(inference("r11", T0 + 11))
    with open(tmp_path / "log" / "inferences" / f"{0:020d}.jsonl", "ab") as fh:
        fh.write(partial[:40])
    with Store.open(config.store) as store:
        assert FileIngestor(config, store).drain() == 2
        assert snapshot(store) == (11, 1, 7, 1, 6)
    with open(tmp_path / "log" / "inferences" / f"{0:020d}.jsonl", "ab") as fh:
        fh.write(partial[40:] + b"\n")
    log.labels(label("r11", 1, T0 + 200))
    with Store.open(config.store) as store:
        assert FileIngestor(config, store).drain() == 2
        assert snapshot(store) == (12, 1, 8, 1, 7)
        assert store.counters().get("bad_records", 0) == 0


def test_crash_mid_batch_replays_the_uncommitted_batch_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = file_config(tmp_path)
    log = LogDir(tmp_path / "log")
    log.inferences(*(inference(f"r{i}", T0 + i) for i in range(10)))
    log.labels(*(label(f"r{i}", 1, T0 + 50) for i in range(10)))
    calls = {"n": 0}
    real_ingest = Store.ingest

    def crash_on_third(self: Store, batch: Any, offsets: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return real_ingest(self, batch, offsets)

    monkeypatch.setattr(Store, "ingest", crash_on_third)
    with Store.open(config.store) as store, pytest.raises(RuntimeError, match="power cut"):
        FileIngestor(config, store).drain()
    monkeypatch.setattr(Store, "ingest", real_ingest)
    with Store.open(config.store) as store:
        FileIngestor(config, store).drain()
        assert snapshot(store) == (10, 0, 10, 0, 10)


async def test_segments_rotation_and_worker_directories(tmp_path: Path) -> None:
    # The real file sink, tiny segments, two gateway workers writing side by side.
    sinks = [FileSink(tmp_path / "log" / f"worker-{w}", segment_bytes=2_000, fsync="never")
             for w in range(2)]
    for sink in sinks:
        await sink.start()
    for i in range(40):
        sinks[i % 2].emit("inferences", f"r{i}", orjson.dumps(inference(f"r{i}", T0 + i)))
        sinks[(i + 1) % 2].emit("labels", f"r{i}", orjson.dumps(label(f"r{i}", 1, T0 + 99)))
    sinks[0].emit("audit", "x", orjson.dumps({"schema_version": 1, "kind": "audit"}))
    for sink in sinks:
        await sink.close()
    segments = list((tmp_path / "log").rglob("*.jsonl"))
    assert len(segments) > 10
    config = file_config(tmp_path, batch_records=7)
    with Store.open(config.store) as store:
        ingestor = FileIngestor(config, store)
        await asyncio.to_thread(ingestor.drain)
        assert snapshot(store) == (40, 0, 40, 0, 40)
        assert set(store.offsets("file:")) == {
            f"file:worker-{w}/{s}" for w in range(2) for s in ("inferences", "labels")}
        assert store.counters() == {}  # the audit stream is not read at all


def test_progress_reports_rows_and_rate() -> None:
    lines: list[str] = []
    now = [0.0]
    progress = Progress(interval_s=10, clock=lambda: now[0], emit=lines.append)
    now[0] = 5.0
    progress.add(IngestResult(records=1000, rows=1000, labels=500))
    assert lines == []
    now[0] = 11.0
    progress.add(IngestResult(records=1000, rows=1000, bad=2))
    assert len(lines) == 1
    assert "ingested 2,502 records" in lines[0]
    assert "/s" in lines[0]
    assert "2 bad" in lines[0]


# -- config -----------------------------------------------------------------------------------


def test_config_env_overrides_and_validation() -> None:
    env = {"UNDERSTUDY_STORE_JOIN_WINDOW": "7d", "UNDERSTUDY_SOURCE_TYPE": "kafka",
           "UNDERSTUDY_SOURCE_KAFKA_GROUP_ID": "eval-2", "UNDERSTUDY_DECISION_ALPHA": "0.01",
           "UNDERSTUDY_DECISION_SEQUENTIAL": "false", "UNDERSTUDY_ADMIN_TOKEN": "not ours",
           "UNDERSTUDY_LOG_PATH": "the gateway's"}
    config = parse_config({"routes": {"price": {"task": "regression",
                                                "decision": {"primary_metric": "rmse"}}}}, env)
    assert config.store.join_window == 7 * 86400
    assert config.source.type == "kafka"
    assert config.source.kafka.group_id == "eval-2"
    assert config.decision["alpha"] == 0.01
    assert config.decision["sequential"] is False
    assert config.decision_for("price")["primary_metric"] == "rmse"
    assert config.decision_for("price")["alpha"] == 0.01  # global values still apply
    assert config.decision_for("fraud")["primary_metric"] == "auroc"
    for raw, message in [
        ({"store": {"join_window": "two weeks"}}, "store.join_window"),
        ({"store": {"duplicate_labels": "first_wins"}}, "last_wins"),
        ({"source": {"kafka": {"topic": "x"}}}, "source.kafka: unknown key"),
        ({"decision": {"alpha": 2}}, "decision.alpha"),
        ({"routes": {"r": {"decision": {"margin": -1}}}}, "routes.r.decision.margin"),
        ({"stores": {}}, "unknown top-level"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(raw, env={})
    with pytest.raises(ConfigError, match=r"store\.engine"):
        parse_config({}, env={"UNDERSTUDY_STORE_ENGINE": "postgres"})


def test_shipped_config_loads() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "evaluator.yaml",
                         env={})
    assert config.store.engine == "duckdb"
    assert config.features["features"][0] == "amount_z"


# -- CLI ----------------------------------------------------------------------------------------


def write_config(tmp_path: Path, gateway: str = "http://127.0.0.1:9") -> Path:
    path = tmp_path / "evaluator.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "store.duckdb"), "lock_timeout_s": 5},
        "report": {"out": str(tmp_path / "reports"), "window": "7d"},
        "gateway": {"url": gateway},
    }))
    return path


def test_cli_run_once_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    log = LogDir(tmp_path / "log")
    log.inferences(*(inference(f"r{i}", T0 + i * 3600) for i in range(300)))
    log.labels(*(label(f"r{i}", i % 2, T0 + 1e6) for i in range(0, 300, 2)))
    assert cli.main(["run", "--once", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ingested 450 records" in out

    assert cli.main(["report", "--config", str(path), "--route", "fraud", "--window", "2d"]) == 0
    summary = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert summary["route"] == "fraud"
    assert summary["n"] == 24  # r251..r299 in the last 2 days; the even ones are labelled
    assert summary["join_stats"]["inferences"] == 49
    assert [d["decision"] for d in summary["decisions"]] == ["INCONCLUSIVE"]  # 24 < min_samples
    assert summary["models"][CHAL]["role"] == "challenger"
    assert summary["report_schema_version"] == REPORT_SCHEMA_VERSION  # the real report
    assert (tmp_path / "reports" / "report.md").exists()
    assert (tmp_path / "reports" / "report.html").exists()

    assert cli.main(["report", "--config", str(path), "--route", "nope"]) == 3
    assert "Routes in the store: fraud" in capsys.readouterr().err


def test_report_while_the_ingest_loop_runs(tmp_path: Path) -> None:
    # DuckDB lets one process at a time open the file: the loop must hand it over to a report.
    path = write_config(tmp_path)
    log = LogDir(tmp_path / "log")
    log.inferences(*(inference(f"r{i}", T0 + i) for i in range(50)))
    log.labels(*(label(f"r{i}", 1, T0 + 99) for i in range(50)))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "evaluator", "run", "--config", str(path)],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "store.duckdb").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        reports = tmp_path / "reports" / "report.json"
        while time.monotonic() < deadline:
            if cli.main(["report", "--config", str(path), "--route", "fraud"]) == 0:
                break
            time.sleep(0.2)  # not ingested yet
        assert json.loads(reports.read_text())["n"] == 50
        log.inferences(inference("late", T0 + 60))
        log.labels(label("late", 0, T0 + 99))
        while time.monotonic() < deadline:
            assert cli.main(["report", "--config", str(path), "--route", "fraud"]) == 0
            if json.loads(reports.read_text())["n"] == 51:
                break
            time.sleep(0.2)
        assert json.loads(reports.read_text())["n"] == 51
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "ingested 102 records" in out


class _Admin(BaseHTTPRequestHandler):
    """A stand-in admin API: GET shows LIVE, POST records the call."""

    calls: ClassVar[list[tuple[str, str | None, dict[str, Any]]]] = []
    live: ClassVar[dict[str, Any]] = {}

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.calls.append((f"GET {self.path}", self.headers.get("Authorization"), {}))
        self._send(200, self.live)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, self.headers.get("Authorization"), body))
        self._send(200, {"route": "fraud", "champion": body["model"]})

    def log_message(self, *args: Any) -> None:
        return None


LIVE = {"name": "fraud", "version": 7, "champion": {"model": CHAMP},
        "challengers": [{"model": CHAL, "experiment": {"id": "x1", "started": T0}}]}


@pytest.fixture
def admin() -> Any:
    _Admin.calls = []
    _Admin.live = json.loads(json.dumps(LIVE))
    server = HTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Admin.calls
    server.shutdown()
    server.server_close()


def write_report(directory: Path, decision: Any, route: str = "fraud", **extra: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps({"route": route, "decisions": [decision],
                                                       "generated_at": time.time(), **extra}))


def bound(verdict: str = "PROMOTE", **experiment: Any) -> dict[str, Any]:
    """A decision bound to LIVE's state (as evaluator.report writes it)."""
    return {"decision": verdict, "challenger": CHAL, "experiment": {
        "id": "x1", "route": "fraud", "champion": CHAMP, "challenger": CHAL, "started": T0,
        "data_end": T0 + 10, "registry_version": 7, **experiment}}


def test_promote_calls_the_admin_api_only_on_promote(tmp_path: Path, admin: Any,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    url, calls = admin
    path = write_config(tmp_path, gateway=url)
    reports = tmp_path / "reports"
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", "s3cret")
    args = ["promote", "--config", str(path), "--route", "fraud"]

    assert cli.main(args) == 3  # no report yet
    write_report(reports / "old", {"decision": "KEEP", "challenger": CHAL,
                                   "reasons": ["worse AUROC"]})
    assert cli.main(args) == 3
    assert calls == []
    assert "not PROMOTE" in capsys.readouterr().err

    write_report(reports / "new", bound())
    monkeypatch.delenv("UNDERSTUDY_ADMIN_TOKEN")
    assert cli.main(args) == 2  # no token: refuses before calling
    assert calls == []
    monkeypatch.setenv("UNDERSTUDY_ADMIN_READ_TOKEN", "r3ad")
    assert cli.main([*args, "--dry-run"]) == 0  # the read token is enough to check
    assert calls == [("GET /admin/routes/fraud", "Bearer r3ad", {})]
    assert '"expected_version": 7, "experiment": "x1"' in capsys.readouterr().out
    calls.clear()
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", "s3cret")
    assert cli.main(args) == 0
    assert calls == [("GET /admin/routes/fraud", "Bearer s3cret", {}),
                     ("/admin/routes/fraud/promote", "Bearer s3cret",
                      {"model": CHAL, "expected_version": 7, "experiment": "x1"})]
    assert f"promoted {CHAL}" in capsys.readouterr().out


@pytest.mark.parametrize(("change", "message"), [
    (lambda live, rep: rep.update(route="price"), "for route 'price', not 'fraud'"),
    (lambda live, rep: rep.update(generated_at=time.time() - 27 * 3600), "older than"),
    (lambda live, rep: live.update(champion={"model": "fraud_v5"}), "live champion"),
    (lambda live, rep: live.update(challengers=[]), "no longer a challenger"),
    (lambda live, rep: live["challengers"][0].update(experiment={"id": "x2"}),
     "live experiment is 'x2'"),
    (lambda live, rep: live.update(version=8), "registry version 8"),
    (lambda live, rep: rep["decisions"][0]["experiment"].update(registry_version=None),
     "does not say which registry version"),
])
def test_promote_refuses_a_report_that_does_not_match_the_live_route(
        tmp_path: Path, admin: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], change: Any, message: str) -> None:
    url, calls = admin
    path = write_config(tmp_path, gateway=url)
    report = {"route": "fraud", "generated_at": time.time(), "decisions": [bound()]}
    change(_Admin.live, report)
    out = tmp_path / "reports" / "report.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps(report))
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", "s3cret")
    for extra in (["--dry-run"], []):
        code = cli.main(["promote", "--config", str(path), "--route", "fraud",
                         "--report", str(out), *extra])
        assert code == cli.ExitCode.REFUSED
        assert message in capsys.readouterr().err
    assert not [c for c in calls if c[0].endswith("/promote")]  # nothing was changed


def test_promote_a_blocked_report_has_its_own_exit_code(tmp_path: Path, admin: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    url, calls = admin
    path = write_config(tmp_path, gateway=url)
    write_report(tmp_path / "reports", bound("BLOCKED"))
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", "s3cret")
    assert cli.main(["promote", "--config", str(path), "--route", "fraud"]) == cli.ExitCode.BLOCKED
    assert calls == []


def test_max_report_age_is_a_decision_duration(tmp_path: Path) -> None:
    config = parse_config({"decision": {"max_report_age": "2h"}}, env={})
    assert config.decision["max_report_age"] == 7200.0
    assert parse_config({}, env={}).decision["max_report_age"] == 26 * 3600.0
    with pytest.raises(ConfigError, match="max_report_age"):
        parse_config({"decision": {"max_report_age": "soon"}}, env={})
    # config keys the decision policy has no field for are not handed to it; a typo still is
    from evaluator.decision import DecisionPolicy

    DecisionPolicy.from_mapping(cli.policy_mapping(config, "fraud"))
    bad = parse_config({"decision": {"primary_metrik": "auroc"}}, env={})
    with pytest.raises(ValueError, match="primary_metrik"):
        DecisionPolicy.from_mapping(cli.policy_mapping(bad, "fraud"))


def test_read_decision_reads_the_decisions_evaluator_report_writes() -> None:
    def entry(challenger: str, verdict: str) -> dict[str, Any]:
        return {"challenger": challenger, "decision": verdict, "reasons": [f"{verdict}: why"]}

    assert cli.read_decision({"decisions": [entry("a", "KEEP")]}) == ("KEEP", "a", "KEEP: why")
    assert cli.read_decision({"decisions": [entry("a", "KEEP"), entry("b", "PROMOTE")]}) == (
        "PROMOTE", "b", "PROMOTE: why")
    both = {"decisions": [entry("a", "PROMOTE"), entry("b", "PROMOTE")]}
    assert cli.read_decision(both)[0] == "AMBIGUOUS"
    assert cli.read_decision({"decisions": []}) == (None, None, "")
    # other spellings are not ours: a report with only them has no decision to apply
    assert cli.read_decision({"decision": {"verdict": "PROMOTE", "model": "a"}})[0] is None


def test_promote_cannot_reach_the_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, gateway="http://127.0.0.1:9")  # nothing listens on port 9
    write_report(tmp_path / "reports", bound())
    monkeypatch.setenv("UNDERSTUDY_ADMIN_TOKEN", "s3cret")
    code = cli.main(["promote", "--config", str(path), "--route", "fraud"])
    assert code == cli.ExitCode.UNREACHABLE == 6
    assert "cannot reach the gateway" in capsys.readouterr().err


# -- Kafka ------------------------------------------------------------------------------------


async def _produce(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        for r in records:
            await producer.send(topic, orjson.dumps(r), key=r["request_id"].encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _create_topics(bootstrap: str, *topics: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    client = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await client.start()
    try:
        await client.create_topics([NewTopic(t, num_partitions=2, replication_factor=1)
                                    for t in topics])
    finally:
        await client.close()


@pytest.mark.kafka
async def test_kafka_group_restart_resumes_without_double_counting(
        kafka: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import AIOKafkaConsumer

    from tests.support.kafka import unique_topic

    inf_topic, label_topic = unique_topic("eval-inf"), unique_topic("eval-labels")
    await _create_topics(kafka.bootstrap, inf_topic, label_topic)
    config = parse_config({
        "source": {"type": "kafka", "batch_records": 7, "poll_interval_s": 0.2,
                   "kafka": {"bootstrap": kafka.bootstrap, "inferences_topic": inf_topic,
                             "labels_topic": label_topic, "group_id": f"g-{inf_topic}"}},
        "store": {"path": str(tmp_path / "store.duckdb")},
    }, env={})

    async def run_once() -> None:
        with Store.open(config.store) as store:
            await asyncio.wait_for(KafkaIngestor(config, store).run(once=True), 120)

    first = [inference(f"r{i}", T0 + i) for i in range(20)]
    await _produce(kafka.bootstrap, inf_topic, [*first, first[0]])  # one re-delivery
    await _produce(kafka.bootstrap, label_topic, [label(f"r{i}", i % 2, T0 + 99)
                                                  for i in range(15)])
    # First run crashes "between the store commit and the Kafka commit": nothing committed to
    # the group, so only the store's own positions can prevent a double count.
    monkeypatch.setattr(AIOKafkaConsumer, "commit", _no_commit)
    await run_once()
    monkeypatch.undo()
    with Store.open(config.store, read_only=True) as store:
        assert snapshot(store) == (20, 1, 15, 0, 15)

    await _produce(kafka.bootstrap, inf_topic, [inference("r20", T0 + 20), first[5]])
    await _produce(kafka.bootstrap, label_topic, [label("r5", 1, T0 + 120),
                                                  label("r20", 0, T0 + 120)])
    await run_once()  # restart: resumes, re-reads nothing
    await run_once()  # and once more with nothing new
    with Store.open(config.store, read_only=True) as store:
        assert snapshot(store) == (21, 2, 17, 1, 16)
        positions = store.offsets("kafka:")
        assert sum(int(v) for v in positions.values()) == 21 + 2 + 15 + 2
        ds = store.load_dataset("fraud")
        assert set(ds.models) == {CHAMP, CHAL}


async def _no_commit(self: Any, offsets: Any = None) -> None:
    return None
