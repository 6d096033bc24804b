"""Push one report's outcome to the Pushgateway, grouped by job=understudy-report, route.

POST, not PUT: a failed run replaces only the exit code, so the last success timestamp
survives it and the UnderstudyReportStale alert can see how old it is.
"""
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from evaluator.cli import read_decision

route, code, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
lines = ["# TYPE understudy_report_last_exit_code gauge",
         f"understudy_report_last_exit_code {code}"]
if code in (0, 3):
    lines += ["# TYPE understudy_report_last_success_timestamp_seconds gauge",
              f"understudy_report_last_success_timestamp_seconds {time.time():.0f}"]
reports = sorted(out.rglob("report.json"), key=lambda p: p.stat().st_mtime)
if code == 0 and reports:
    verdict, model, _ = read_decision(json.loads(reports[-1].read_text()))
    if verdict:
        lines += ["# TYPE understudy_report_decision gauge",
                  f'understudy_report_decision{{verdict="{verdict}",model="{model or ""}"}} 1']
base = os.environ["PUSHGATEWAY_URL"].rstrip("/")
if not base.startswith(("http://", "https://")):
    sys.exit(f"report: PUSHGATEWAY_URL must be an http(s) URL, got {base!r}")
url = f"{base}/metrics/job/understudy-report/route/{urllib.parse.quote(route, safe='')}"
request = urllib.request.Request(  # noqa: S310 (an http(s) URL, checked above)
    url, data=("\n".join(lines) + "\n").encode(), method="POST",
    headers={"Content-Type": "text/plain; version=0.0.4"})
with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (as above)
    print(f"report: pushed {route} (exit {code}) to {base}: HTTP {response.status}")
