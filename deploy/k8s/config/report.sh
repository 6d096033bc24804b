# The daily report job (CronJob understudy-report; the report service in
# deploy/docker-compose.yml): one report per route in $REPORT_ROUTES, each followed by a
# Pushgateway push of its outcome ($PUSHGATEWAY_URL).
set -u
day=$(date -u +%Y-%m-%d)
status=0
for route in $REPORT_ROUTES; do
  out="/var/lib/understudy/reports/$day/$route"
  python -m evaluator report --config /etc/understudy/evaluator.yaml --route "$route" --out "$out"
  code=$?
  python /etc/understudy/push_report.py "$route" "$code" "$out" \
    || echo "report: Pushgateway push for $route failed" >&2
  # 3 = no labelled data in the window yet: a summary was written, nothing failed.
  if [ "$code" -ne 0 ] && [ "$code" -ne 3 ]; then status=1; fi
done
exit "$status"
