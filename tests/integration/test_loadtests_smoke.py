"""The load-test kit runs: locust headless against real Triton and a real gateway process.

The smoke test (CI, `make test`) runs loadtests/locustfile.py for ~10 s against
`python -m gateway serve` (a subprocess: locust needs a gateway that does not share the test's
event loop) in front of the session's Triton, and checks that every scenario ran with zero
failures and that the gateway logged every inference it served. The long runs (`-m slow`,
`make bench` territory) run locust for a minute with live admin changes, and the benchmark in
its quick mode. No test asserts on timings: the benchmark reports those.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loadtests import ablate, callback_cpu, common, cpu_split
from loadtests.load import load_routes, run_locust
from tests.conftest import read_stream

pytestmark = pytest.mark.triton

INFER_ROWS = ("POST infer fraud (json)", "POST infer fraud (binary)", "POST infer price (json)")
ADMIN_AVAILABLE = (common.ROOT / "gateway" / "rest" / "admin.py").exists()


def _run(triton: Any, tmp_path: Path, *, duration: float, users: int,
         admin_token: str | None) -> tuple[dict[str, Any], Path]:
    config = common.gateway_config(triton.url, tmp_path, "smoke", load_routes())
    env = {"LOADTEST_LABEL_DELAY_S": "1", "LOADTEST_ADMIN_PERIOD_S": "2",
           "LOADTEST_SERVED_IDS_FILE": str(tmp_path / "served-ids.txt")}
    gw_env: dict[str, str] = {}
    if admin_token:
        env["UNDERSTUDY_ADMIN_TOKEN"] = gw_env["UNDERSTUDY_ADMIN_TOKEN"] = admin_token
    else:
        env["UNDERSTUDY_ADMIN_TOKEN"] = ""
    with common.Gateway(config, log_file=tmp_path / "gateway.log", env=gw_env) as gateway:
        stats = run_locust(gateway.url, tmp_path / "locust", duration=duration, users=users,
                           spawn_rate=users, env=env, html=False)
    # the gateway has stopped (SIGTERM): pending records were drained and the sink flushed
    return stats, tmp_path / "log-smoke"


def _failures(path: str) -> str:
    failures = Path(path).with_name("locust_failures.csv")
    return failures.read_text() if failures.exists() else ""


def _check(stats: dict[str, Any], log_dir: Path) -> None:
    agg = stats["aggregated"]
    assert int(agg["Request Count"]) > 0
    assert int(agg["Failure Count"]) == 0, _failures(stats["path"])
    for name in (*INFER_ROWS, "POST feedback (batch)"):
        assert name in stats["rows"], f"scenario {name!r} never ran: {sorted(stats['rows'])}"
        assert int(stats["rows"][name]["Request Count"]) > 0
    # 100% logging: every request locust got an answer for has its record (requests still in
    # flight when locust stopped were served and logged too, but not counted by locust)
    served = set((log_dir.parent / "served-ids.txt").read_text().split())
    logged = [r["request_id"] for r in read_stream(log_dir, "inferences")]
    assert len(served) >= sum(int(stats["rows"][n]["Request Count"]) for n in INFER_ROWS)
    assert served <= set(logged), f"{len(served - set(logged))} served requests not logged"
    assert len(logged) == len(set(logged))
    assert read_stream(log_dir, "labels")


def test_locust_smoke(triton: Any, tmp_path: Path) -> None:
    """~10 s of mixed JSON/binary/price inference and delayed feedback, with zero failures."""
    token = "smoke-admin-token" if ADMIN_AVAILABLE else None
    stats, log_dir = _run(triton, tmp_path, duration=10, users=4, admin_token=token)
    _check(stats, log_dir)
    if token:
        admin = [r for n, r in stats["rows"].items() if n.startswith(("PUT admin", "POST admin"))]
        assert sum(int(r["Request Count"]) for r in admin) > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_locust_long_run_with_admin_changes(triton: Any, tmp_path: Path) -> None:
    stats, log_dir = _run(triton, tmp_path, duration=60, users=20,
                          admin_token="long-run-token" if ADMIN_AVAILABLE else None)
    _check(stats, log_dir)


def _run_bench(tmp_path: Path, *args: str, timeout: float = 600) -> dict[str, Any]:
    """`bench.py --quick ARGS` in a subprocess; its results.json once it exits 0."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "loadtests/bench.py", "--quick", *args, "--out", str(out)],
        cwd=common.ROOT, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONPATH": str(common.ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    return results


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the quick benchmark alone takes 4-6 minutes
def test_bench_quick(tmp_path: Path) -> None:
    """The whole benchmark in --quick mode: every scenario runs and nothing served is unlogged."""
    results = _run_bench(tmp_path, "--no-md", "--no-profile", "--overload-seconds", "10",
                         timeout=1500)
    rows = {r["key"]: r for r in results["rows"]}
    assert {"direct", "nginx-mirror", "champion-file-w1", "shadow1-file-w1", "shadow2-file-w1",
            "explore-file-w1"} <= rows.keys()
    for row in rows.values():
        assert row["error"] is None, row
        assert row["capacity"]["requests"] > 0
        if row["logged"] is not None:
            assert row["logged"] >= row["served"], row  # warm-up requests are logged too
    for key in ("nginx-mirror", "champion-file-w1", "shadow1-file-w1"):
        assert rows[key]["moderate_cpu_ms"] > 0, rows[key]  # CPU at the fixed rate, measured
    _check_slow(results["extra"]["slow"], rounds=2)
    _check_paired(results["extra"]["paired_cpu"], rounds=3)
    assert len(results["extra"]["capacity_rounds"]["rounds"]) == 2
    _check_added_latency(results["extra"]["added_latency"], rounds=2)
    assert "error" not in results["extra"]["overload"]


def _check_paired(paired: dict[str, Any], rounds: int) -> None:
    """Both proxies measured in every round at every rate, the ratio being theirs."""
    assert "error" not in paired, paired
    assert len(paired["rounds"]) == rounds * len(paired["rates"])
    for r in paired["rounds"]:
        assert r["gateway"]["cpu_ms"] > 0 and r["nginx"]["cpu_ms"] > 0, r
        assert r["gateway"]["errors"] == r["nginx"]["errors"] == 0, r
        assert r["ratio"] == r["gateway"]["cpu_ms"] / r["nginx"]["cpu_ms"]
        assert 0.0 <= r["gateway"]["copies_lost"] <= 1.0, r  # read from the gateway's metrics
        assert "copies_lost" not in r["nginx"]
    for summary in paired["by_rate"].values():
        assert min(summary["ratios"]) <= summary["ratio"] <= max(summary["ratios"])
        same = [x for x, same_work in summary["all_ratios"] if same_work]
        assert summary["ratios"] == (same or [x for x, _ in summary["all_ratios"]])
        assert summary["rounds_used"] == len(same)


def test_paired_cpu_comparison_runs_side_by_side(tmp_path: Path) -> None:
    """bench.py's side-by-side CPU phase alone, short: nginx's mirror and the gateway (+1
    shadow) loaded at once, each measured from /proc over the same window."""
    results = _run_bench(tmp_path, "--no-kafka", "--phases", "paired", "--paired-rates", "300",
                         "--md", str(tmp_path / "BENCH.md"))
    paired = results["extra"]["paired_cpu"]
    _check_paired(paired, rounds=3)
    # at 300 req/s the lane has room: copies answered, both sides did the same work (in at
    # least one of the three rounds: a stall of the shared CI machine can fill the lane, or
    # keep a proxy under 97% of the rate, in a round or two)
    assert any(r["gateway"]["copies_lost"] == 0.0 and r["same_work"]
               for r in paired["rounds"]), paired["rounds"]
    assert "gateway + 1 shadow vs the nginx mirror" in (tmp_path / "BENCH.md").read_text()


@pytest.mark.kafka
def test_capacity_rounds_alternate_gateways_and_mirrors(tmp_path: Path) -> None:
    """bench.py's alternating capacity phase alone, short: both nginx mirrors and the gateway
    + 1 shadow with the file and the Kafka log (a broker of its own) each run closed loop in
    every round, the order reversed in the second; the ratios are the rounds' own."""
    results = _run_bench(tmp_path, "--phases", "capacity", "--md", str(tmp_path / "BENCH.md"))
    capacity = results["extra"]["capacity_rounds"]
    assert "error" not in capacity, capacity
    assert capacity["kafka"] == "used"
    proxies = ["nginx-mirror", "nginx-kept", "gateway-file", "gateway-kafka"]
    assert [r["round"] for r in capacity["rounds"]] == [0, 1]
    for r in capacity["rounds"]:
        assert all(r[name]["rps"] > 0 and r[name]["errors"] == 0 for name in proxies), r
        assert all(0.0 <= r[name]["copies_lost"] <= 1.0 for name in proxies[2:]), r
        assert "copies_lost" not in r["nginx-mirror"]
    assert len(capacity["by_pair"]) == 4
    for pair in capacity["by_pair"].values():
        ratios = [r[pair["gateway"]]["rps"] / r[pair["nginx"]]["rps"]
                  for r in capacity["rounds"]]
        assert pair["ratios"] == ratios
        assert pair["ratio"] == statistics.median(ratios)
        assert pair["ci"][0] <= pair["ratio"] <= pair["ci"][1]
        work = [x * (2 - r[pair["gateway"]]["copies_lost"]) / 2
                for x, r in zip(ratios, capacity["rounds"], strict=True)]
        assert pair["work_ratio"] == statistics.median(work) <= pair["ratio"]
    assert "Capacity in alternating rounds" in (tmp_path / "BENCH.md").read_text()


def _check_added_latency(added: dict[str, Any], rounds: int) -> None:
    """Every gateway and the A/A pair measured against direct Triton in every round, the
    order alternating; each added number is the two sides' difference in that window."""
    assert "error" not in added, added
    kinds = ["champion", "shadow1", "AA"]
    assert [r["kind"] for r in added["rounds"]] == (kinds + kinds[::-1]) * (rounds // 2)
    for r in added["rounds"]:
        assert r["direct"]["errors"] == r["other"]["errors"] == 0, r
        assert r["direct"]["requests"] > 0 and r["other"]["requests"] > 0, r
        assert r["added_p50"] == r["other"]["p50"] - r["direct"]["p50"]
        assert r["added_p99"] == r["other"]["p99"] - r["direct"]["p99"]
    for kind in kinds:
        summary = added["by_kind"][kind]
        for q in ("p50", "p99"):
            mine = [r[f"added_{q}"] for r in added["rounds"] if r["kind"] == kind]
            assert summary[f"{q}_rounds"] == mine
            assert summary[q] == statistics.median(mine)
            assert summary[f"{q}_ci"][0] <= statistics.fmean(mine) <= summary[f"{q}_ci"][1]


def test_added_latency_is_measured_side_by_side_with_direct_triton(tmp_path: Path) -> None:
    """bench.py's added-latency phase alone, short: each gateway (champion only, + 1 shadow)
    and direct Triton loaded at once, and direct Triton against itself (A/A)."""
    results = _run_bench(tmp_path, "--no-kafka", "--phases", "latency",
                         "--md", str(tmp_path / "BENCH.md"))
    _check_added_latency(results["extra"]["added_latency"], rounds=2)
    assert results["extra"]["added_latency"]["rate"] == results["light_rate"]
    text = (tmp_path / "BENCH.md").read_text()
    assert "Added latency side by side" in text and "A/A: the noise floor" in text


def _check_slow(slow: dict[str, Any], rounds: int) -> None:
    """Every comparison ran in every round, the carrier alternating, with its interval."""
    assert "error" not in slow, slow
    runs = slow["runs"]
    assert len(runs) == 3 * rounds
    for kind in ("B", "C", "AA"):
        mine = [r for r in runs if r["kind"] == kind]
        assert [r["carrier"] for r in mine] == ["P", "Q"] * (rounds // 2)
        for r in mine:
            assert r["carrier_run"]["errors"] == r["other_run"]["errors"] == 0, r
            assert r["p99_ratio"] == r["carrier_run"]["p99"] / r["other_run"]["p99"]
        low, high = slow[kind]["p99_change_ci_pct"]
        assert low <= high, slow[kind]
    assert slow["shadow"]["fraud_slow"]["sent"] > 0  # the slow shadow really was on


def test_slow_challenger_comparison_runs_paired(tmp_path: Path) -> None:
    """bench.py's slow-challenger phase alone, short: two gateways at once, the shadow under
    test added and removed through the real admin API each round, both sides answered."""
    results = _run_bench(tmp_path, "--no-md", "--no-kafka", "--phases", "slow",
                         "--slow-rate", "100")
    _check_slow(results["extra"]["slow"], rounds=2)


def test_paired_rate_is_lowered_until_both_sides_do_the_same_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.py's phase paired measures only at a rate both proxies serve in full with every
    shadow copy answered: here 1,000 req/s loses copies, 700 is not carried, 490 is."""
    from loadtests import bench

    def fake_measure(proxies: Any, body_file: Any, body: Any, rate: float, seconds: float,
                     load_cpus: Any, gateways: Any) -> list[dict[str, float]]:
        gateway = {"rps": rate, "copies_lost": 0.2 if rate > 900 else 0.0}
        nginx = {"rps": rate * (0.9 if rate > 500 else 1.0)}
        return [nginx, gateway]

    monkeypatch.setattr(cpu_split, "measure", fake_measure)
    logged: list[str] = []
    fake_bench = SimpleNamespace(body_file=None, body=None, load_cpus=None, log=logged.append,
                                 args=SimpleNamespace(paired_seconds=1))
    assert bench.Bench.carried_rate(fake_bench, [], 1000.0, "http://gw") == 490.0  # type: ignore[arg-type]
    assert len(logged) == 2 and "20.0% of its shadow copies" in logged[0], logged


def test_same_work_needs_the_rate_served_and_the_copies_answered() -> None:
    from loadtests import bench

    nginx = {"rps": 990.0}
    assert bench.same_work([{"rps": 1000.0, "copies_lost": 0.0}, nginx], 1000)
    assert not bench.same_work([{"rps": 1000.0, "copies_lost": 0.02}, nginx], 1000)  # shed
    assert not bench.same_work([{"rps": 1000.0, "copies_lost": 0.0}, {"rps": 900.0}], 1000)


def test_lost_share_counts_copies_decided_but_not_answered() -> None:
    before = {"sent": 100.0, "ok": 90.0, "shed": 10.0}
    after = {"sent": 200.0, "ok": 160.0, "shed": 30.0, "timeout": 5.0, "error": 5.0}
    # decided meanwhile: 70 ok + 20 shed + 5 timeout + 5 error = 100, of which 30 unanswered
    assert cpu_split.lost_share(before, after) == pytest.approx(0.30)
    assert cpu_split.lost_share(before, before) == 0.0  # nothing decided: nothing lost


def test_ratio_interval_is_a_t_interval_of_the_log_ratios() -> None:
    ratios = [0.9, 1.2, 1.05, 0.97, 1.31]
    logs = [math.log(r) for r in ratios]
    # by hand: mean of the logs +- t(0.975, n - 1) * s / sqrt(n), t from a table (4 df)
    half = 2.776445105 * statistics.stdev(logs) / math.sqrt(len(logs))
    low, high = statistics.fmean(logs) - half, statistics.fmean(logs) + half
    assert common.ratio_interval(ratios) == pytest.approx((math.exp(low), math.exp(high)))


def test_mean_interval_is_a_t_interval_of_the_differences() -> None:
    added = [0.41, 0.38, 0.52, 0.45]
    # by hand: mean +- t(0.975, 3) * s / sqrt(n), t from a table (3 df)
    half = 3.182446305 * statistics.stdev(added) / math.sqrt(len(added))
    mean = statistics.fmean(added)
    assert common.mean_interval(added) == pytest.approx((mean - half, mean + half))
    assert common.mean_interval([0.4]) == (0.4, 0.4)  # one round: no spread to go on


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grpc_bench_runs(tmp_path: Path) -> None:
    """loadtests/grpc_bench.py end to end (short): all three targets answer every request."""
    out = tmp_path / "bench-grpc"
    proc = subprocess.run(
        [sys.executable, "loadtests/grpc_bench.py", "--duration", "1", "--rate", "20",
         "--out", str(out)],
        cwd=common.ROOT, capture_output=True, text=True, timeout=500, check=False,
        env={**os.environ, "PYTHONPATH": str(common.ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["target"] for r in rows] == ["Triton gRPC (direct)", "gateway gRPC",
                                           "gateway HTTP (binary)"]
    assert all(r["requests"] > 0 for r in rows)
    assert all(r["gateway_cpu_us_per_req"] > 0 for r in rows[1:])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_upstream_protocol_bench_runs(tmp_path: Path) -> None:
    """loadtests/upstream_protocol_bench.py end to end (short): both upstream protocols, both
    cases, every request answered (the client asserts 200)."""
    out = tmp_path / "bench-upstream"
    proc = subprocess.run(
        [sys.executable, "loadtests/upstream_protocol_bench.py", "--duration", "1", "--rate",
         "20", "--out", str(out)],
        cwd=common.ROOT, capture_output=True, text=True, timeout=500, check=False,
        env={**os.environ, "PYTHONPATH": str(common.ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted((r["case"], r["protocol"]) for r in rows) == sorted(
        (case, p) for case in ("champion only", "champion + 1 shadow") for p in ("http", "grpc"))
    assert all(r["requests"] > 0 and r["gateway_cpu_us_per_req"] > 0 for r in rows)


# The in-process microbenchmarks (no sockets, seconds each): the script raises unless every
# copy, call or request it drives is answered ok, and prints a CPU cost per unit.
MICROBENCHES = [
    # lane: every copy resolves ok through the lane, batched and one copy per call
    (["loadtests/bench_lane.py", "--copies", "400", "--repeat", "1"], "us CPU per copy"),
    (["loadtests/bench_lane.py", "--copies", "400", "--repeat", "1", "--unbatched", "--burst",
      "1"], "us CPU per copy"),
    # upstream call: every call through the real client and pool is answered
    (["loadtests/bench_upstream_call.py", "--calls", "400", "--repeat", "1"], "us CPU per call"),
    (["loadtests/bench_upstream_call.py", "--calls", "400", "--repeat", "1", "--binary"],
     "us CPU per call"),
    # ingress: every request is answered 200 through the lean server and the data plane
    (["loadtests/ingress_bench.py", "--number", "300", "--repeat", "1"], "us CPU per request"),
    (["loadtests/ingress_bench.py", "--number", "300", "--repeat", "1", "--binary"],
     "us CPU per request"),
    # the machine's wake-up tax: a row per sleep interval
    (["loadtests/wake_cost.py", "--repeat", "20"], "| 10 |"),
]


@pytest.mark.parametrize(("command", "printed"), MICROBENCHES,
                         ids=[" ".join(c[0][0].split("/")[-1:] + c[0][5:]) for c in MICROBENCHES])
def test_microbenchmark_runs(command: list[str], printed: str) -> None:
    proc = subprocess.run(
        [sys.executable, *command], cwd=common.ROOT, capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(common.ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert printed in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_split_runs(tmp_path: Path) -> None:
    """loadtests/cpu_split.py end to end (short): nginx and the gateway measured at one rate,
    every request answered, CPU per request from schedstat."""
    out = tmp_path / "cpu-split"
    proc = subprocess.run(
        [sys.executable, "loadtests/cpu_split.py", "--rates", "100", "--rounds", "1",
         "--seconds", "1", "--floor", "--out", str(out)],
        cwd=common.ROOT, capture_output=True, text=True, timeout=500, check=False,
        env={**os.environ, "PYTHONPATH": str(common.ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [r["proxy"] for r in rows] == ["nginx mirror", "gateway", "floor"]
    assert rows[1]["copies_lost"] == 0.0 and "copies_lost" not in rows[0], rows
    # user/kernel come from clock ticks (10 ms): at this short run only their sign is stable
    assert all(r["errors"] == 0 and r["cpu_ms"] > 0 and min(r["user_ms"], r["sys_ms"]) >= 0
               for r in rows), rows


def _model_inferences(triton_url: str, model: str) -> int:
    status, stats = common.http_json(f"{triton_url}/v2/models/{model}/stats")
    assert status == 200, stats
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def test_floor_proxy_forwards_copies_and_records(triton: Any, tmp_path: Path) -> None:
    """loadtests/floor_proxy.py, the yardstick beside the gateway: every request gets the
    champion's own answer, the shadow gets a copy of each, and each request leaves one record
    holding that answer (written on SIGTERM at the latest)."""
    x, _ = common.fraud_rows(5)
    bodies = [common.json_body(row) for row in x]
    direct = [common.http_json(f"{triton.url}/v2/models/fraud_v3/infer", b.data, b.headers)[1]
              for b in bodies]
    shadow_before = _model_inferences(triton.url, "fraud_v4")
    floor = cpu_split.start_floor(tmp_path, triton.url.split("//", 1)[1])
    try:
        answers = [common.http_json(floor.url, b.data, b.headers) for b in bodies]
        # the shadow's copies are fire and forget: wait until Triton has answered all six
        deadline = time.monotonic() + 10
        while (_model_inferences(triton.url, "fraud_v4") - shadow_before < 1 + len(bodies)
               and time.monotonic() < deadline):
            time.sleep(0.05)
    finally:
        common.stop_process(floor.proc)
    assert floor.proc.returncode == 0
    assert answers == [(200, answer) for answer in direct]
    lines = [json.loads(line) for line in (tmp_path / "floor-log.jsonl").read_bytes().splitlines()]
    assert len(lines) == 1 + len(bodies)
    assert [line["champion"] for line in lines[1:]] == direct
    assert len({line["request_id"] for line in lines}) == len(lines)
    assert _model_inferences(triton.url, "fraud_v4") - shadow_before == len(lines)


def test_a_gateway_runs_on_the_interpreter_it_is_given(triton: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench.py --gateway-python` / `cpu_split.py --python`: the gateway's process is the
    interpreter named, a relative path read from the caller's directory (the gateway runs in
    its tree's), the path kept as given (a virtualenv's python is a symlink that must stay one);
    and the report's description of it is that interpreter's."""
    python = Path(sys.executable)  # the virtualenv's: a symlink
    monkeypatch.chdir(python.parent.parent)
    config = common.gateway_config(triton.url, tmp_path, "py",
                                   {"r": {"champion": {"model": "fraud_v3"}}})
    x, _ = common.fraud_rows(1)
    body = common.json_body(x[0])
    relative = f"{python.parent.name}/{python.name}"
    with common.Gateway(config, python=relative, log_file=tmp_path / "gw.log") as gw:
        status, _ = common.http_json(f"{gw.url}/v2/models/r/infer", body.data, body.headers)
        assert status == 200
        assert gw.proc is not None
        argv0 = Path(f"/proc/{gw.proc.pid}/cmdline").read_bytes().split(b"\0")[0]
    assert argv0.decode() == str(python.parent.parent / relative)
    described = common.interpreter(str(python))
    assert described.startswith(f"{sys.version.split()[0]} {python} (configure: ")
    libpython = "shared" if "libpython" in Path("/proc/self/maps").read_text() else \
        "in the executable"
    assert described.endswith(f"; libpython {libpython})")
    assert common.versions(str(python))["gateway's python"] == described


# what each ablation replaces, and how to read it back in a started gateway's interpreter
ABLATED = {
    "norecord": "from gateway.dataplane.recorder import Recorder as o; f = o.submit",
    "nocopies": "from gateway.dataplane.service import InferenceService as o; "
                "f = o._dispatch_copies",
    "novalidate": "from gateway.dataplane import service as o; f = o.validate_against",
    "nometrics": "from prometheus_client.metrics import Histogram as o; f = o.observe",
    "nodecode": "from gateway.dataplane import recorder as o; f = o.decode_response",
    "nobatch": "from gateway.mirror.shadow import ShadowLane as o; f = o.__init__",
    "nowait": "from gateway.mirror.shadow import ShadowLane as o; f = o.__init__",
    "noprobe": "from gateway.mirror.shadow import ShadowLane as o; f = o.__init__",
    "loopwrite": "from gateway.backends.file_sink import FileSink as o; f = o.emit",
    "deferrecords": "from gateway.dataplane.recorder import Recorder as o; f = o._push",
    "nogc": "import gc as o; f = o.freeze",
}


@pytest.mark.parametrize("name", sorted(ablate.ABLATIONS))
def test_an_ablated_tree_patches_its_gateway_at_start(name: str, tmp_path: Path) -> None:
    """loadtests/ablate.py: the tree's gateway imports, and the named piece is replaced by the
    patch (defined in the tree's sitecustomize), nothing else of the checkout."""
    tree = ablate.make_tree(tmp_path, name)
    probe = (f"import gateway.cli; {ABLATED[name]}; "
             "print(f.__code__.co_filename if hasattr(f, '__code__') else 'builtin')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tree, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tree / "sitecustomize.py"), proc.stdout
    assert set(ABLATED) == set(ablate.ABLATIONS)


def test_ablations_joined_by_a_plus_patch_one_tree_with_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ablate.py a+b`: one tree whose gateway has both pieces replaced (what they cost
    together), and an unknown part is refused by name."""
    tree = ablate.make_tree(tmp_path, "norecord+nowait+noprobe")
    probe = ("import asyncio, gateway.cli; from gateway.dataplane.recorder import Recorder; "
             "from gateway.mirror.shadow import ShadowLane; "
             "print(Recorder.submit.__code__.co_filename); "
             "print(ShadowLane.__init__.__code__.co_filename); "
             "lane = ShadowLane.__new__(ShadowLane); "
             "ShadowLane.__init__(lane, type('U', (), {'pool': lambda *a, **k: None})(), 'r', "
             "'m', '1', max_concurrency=1, max_queue=1, timeout_ms=10, batch_max_wait_ms=5.0, "
             "latency_probe_every=7); "
             "print(lane.batch_wait_s, lane.latency_probe_every)")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tree, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[:2] == [str(tree / "sitecustomize.py")] * 2, proc.stdout
    assert lines[2] == "0.0 0", proc.stdout  # both lane settings overridden, in one tree
    with pytest.raises(SystemExit):
        ablate.main(["--out", str(tmp_path), "norecord+bogus"])
    assert "unknown ablation(s) bogus;" in capsys.readouterr().err


def test_callback_cpu_times_each_step_in_a_running_gateway(tmp_path: Path) -> None:
    """loadtests/callback_cpu.py end to end (short), behind real Triton: every step was timed
    in the gateway, each request came in and was answered and recorded once, and the steps
    fit inside the event loop thread's CPU."""
    result = callback_cpu.measure(common.ROOT, tmp_path, rate=200, seconds=2, shadows=1,
                                  python=sys.executable)
    steps = result["steps"]
    assert result["requests"] > 200, result
    assert set(steps) == {label for _, _, label, _ in callback_cpu.SPOTS}
    for label in ("client bytes in: HTTP parse, admit, validate, champion call",
                  "Triton bytes in: every answer (champion, batches, probes)"):
        # at least one call per request (a dump landing mid-request can leave one uncounted)
        assert steps[label]["calls_per_request"] >= 0.98, steps[label]
    for label in ("one record: build, observe, emit", "the client's answer: render and write",
                  "lane admission (one copy)"):
        assert 0.9 <= steps[label]["calls_per_request"] <= 1.1, (label, steps[label])
    assert all(step["us_per_request"] > 0 for step in steps.values()), steps
    top = sum(steps[label]["us_per_request"]
              for _, _, label, depth in callback_cpu.SPOTS if depth == 0)
    assert 0 < top <= result["loop_thread_us"] * 1.01, result
    assert "| the event loop's thread, in all |" in callback_cpu.report(result)


def test_callback_cpu_refuses_a_tree_with_its_own_sitecustomize(tmp_path: Path) -> None:
    """An ablate.py tree's sitecustomize would be imported instead of the timing one (and the
    gateway would die of the first SIGUSR2): refused before anything starts."""
    tree = ablate.make_tree(tmp_path / "trees", "nogc")
    with pytest.raises(RuntimeError, match=r"sitecustomize\.py of its own"):
        callback_cpu.measure(tree, tmp_path / "work", rate=100, seconds=1, shadows=1,
                             python=sys.executable)


def test_cpu_split_counts_the_main_thread_apart_from_helpers() -> None:
    """cpu_split's counters: a busy helper thread's CPU is in the total, not the main thread's."""
    spun, finish = threading.Event(), threading.Event()

    def spin() -> None:  # 100 ms of this thread's own CPU, however busy the machine is
        while time.thread_time() < 0.1:
            sum(range(1000))
        spun.set()
        finish.wait()  # alive until read: a finished thread leaves /proc/PID/task

    before = cpu_split.read_counters([os.getpid()])
    helper = threading.Thread(target=spin)
    helper.start()
    spun.wait()  # the main thread sleeps meanwhile
    delta = cpu_split.read_counters([os.getpid()]) - before
    finish.set()
    helper.join()
    assert delta.cpu_ms - delta.main_ms >= 95, delta  # the helper's 100 ms
    assert delta.main_ms < 50, delta


def test_calls_per_request_runs(tmp_path: Path) -> None:
    """loadtests/calls_per_request.py end to end (short): the gateway runs under cProfile
    behind real Triton, every request is answered (the script raises otherwise), and the
    count covers the request path (the lean server's parser callbacks are in it)."""
    proc = subprocess.run(
        [sys.executable, "loadtests/calls_per_request.py", "--rate", "200", "--seconds", "2",
         "--top", "200", "--out", str(tmp_path / "calls")],
        cwd=common.ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(common.ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    total = float(proc.stdout.split("calls per request: ")[1].split()[0])
    assert total > 50, proc.stdout[:2000]
    assert "lean_server.py" in proc.stdout and "on_headers_complete" in proc.stdout, proc.stdout
