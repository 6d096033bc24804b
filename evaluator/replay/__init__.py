"""Replay (backtest): a challenger judged on the route's logged traffic (`evaluator replay`).

Modules: `logged` (the logged rows read back from the store), `lane` (the rate cap, the
replay's own pool, shedding), `run` (resending rows and logging outcomes), `records` (replay
records, ids and the checkpoint), `kafka` (the sink for a Kafka source). The CLI is
evaluator/cli/replay.py; the method is in docs/STATISTICS.md ("Replay and the disagreement
explorer").
"""
