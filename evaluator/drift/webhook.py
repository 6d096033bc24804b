"""The drift and guardrail webhook, fired once per episode."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from evaluator.config import DriftConfig
from evaluator.drift.errors import DriftError
from evaluator.drift.result import DriftResult
from evaluator.stats.common import jsonable

log = logging.getLogger(__name__)


class WebhookError(DriftError):
    """The webhook could not be delivered after every retry."""


class WebhookNotifier:
    """POSTs a JSON alert when an episode (drift, or a guardrail breach) starts — once.

    An episode starts on the first run where its condition holds and ends after
    `clear_runs` quiet runs in a row (hysteresis: a statistic hovering at its threshold does
    not page on every crossing). State lives in a small JSON file (written atomically) so
    a CronJob that starts fresh every hour still fires once per episode. Delivery retries on
    connection errors, 429 and 5xx with exponential backoff; a delivery that fails every retry
    is tried again on the next run. Every attempt carries the episode's `Idempotency-Key`, so a
    receiver that answered 500 after acting on the call can drop the repeat.
    """

    def __init__(self, url: str | None, state_path: str | Path, *, token: str | None = None,
                 retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 5.0,
                 clear_runs: int = 2, sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.token = token
        self.state_path = Path(state_path)
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.clear_runs = clear_runs
        self._sleep = sleep
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: DriftConfig, env: Mapping[str, str] | None = None
                    ) -> WebhookNotifier:
        env = os.environ if env is None else env
        return cls(cfg.webhook_url, cfg.state_path, token=env.get(cfg.webhook_token_env) or None,
                   retries=cfg.webhook_retries, backoff_s=cfg.webhook_backoff_s,
                   timeout_s=cfg.webhook_timeout_s, clear_runs=cfg.episode_clear_runs)

    # -- state ------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("drift episode state %s unreadable (%s); starting afresh",
                        self.state_path, exc)
            return {}
        episodes = data.get("episodes") if isinstance(data, dict) else None
        return episodes if isinstance(episodes, dict) else {}

    def _save(self, episodes: Mapping[str, Any]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".drift_state.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "episodes": episodes}, fh, indent=1)
            os.replace(tmp, self.state_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def episodes(self) -> dict[str, Any]:
        return self._load()

    def pinned_until(self, route: str) -> float | None:
        """Where the log reference ends while the route's drift episode is open (None: no
        open episode, or it started on a file reference)."""
        st = self._load().get(f"{route}:drift")
        if not isinstance(st, dict) or not st.get("active"):
            return None
        value = st.get("reference_until")
        return float(value) if isinstance(value, int | float) else None

    # -- delivery ---------------------------------------------------------------------------

    def send(self, payload: Mapping[str, Any], idempotency_key: str) -> int:
        """POST with retries; returns the attempts used. Raises WebhookError when it fails."""
        if not self.url:
            raise WebhookError("no webhook URL configured (drift.webhook_url / "
                               "UNDERSTUDY_DRIFT_WEBHOOK_URL)")
        body = json.dumps(jsonable(dict(payload))).encode()
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key,
                   "User-Agent": "understudy-evaluator"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            req = urllib.request.Request(self.url, data=body, method="POST",  # noqa: S310
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                    resp.read()
                return attempt + 1
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code != 429 and exc.code < 500:
                    raise WebhookError(f"webhook {self.url} refused the alert ({last}); not "
                                       f"retrying a client error") from None
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            log.warning("webhook attempt %d/%d failed: %s", attempt + 1, self.retries + 1, last)
        raise WebhookError(f"webhook {self.url}: {self.retries + 1} attempts failed (last: "
                           f"{last})")

    def observe(self, key: str, active: bool, payload: Mapping[str, Any],
                now: float | None = None, reference_until: float | None = None) -> str:
        """Record one run's state of episode `key`; fire when an episode starts.

        `reference_until`: where this run's log reference ended; kept from the run that opens
        the episode, it pins the reference until the episode ends (`pinned_until`).

        Returns `fired`, `already_fired` (same episode), `failed` (retried next run),
        `disabled` (no URL: state is still kept), `quiet` or `cleared` (episode ended).
        """
        now = time.time() if now is None else now
        with self._lock:
            episodes = self._load()
            st = episodes.get(key)
            if not active:
                if not st or not st.get("active"):
                    return "quiet"
                st["quiet_runs"] = int(st.get("quiet_runs", 0)) + 1
                outcome = "quiet"
                if st["quiet_runs"] >= self.clear_runs:
                    st.update(active=False, ended_at=now)
                    outcome = "cleared"
                self._save(episodes)
                return outcome
            if not st or not st.get("active"):
                st = {"id": uuid.uuid4().hex, "active": True, "started_at": now, "fired": False,
                      "attempts": 0, "reference_until": reference_until}
                episodes[key] = st
            st["quiet_runs"] = 0
            st["last_seen"] = now
            if st.get("fired"):
                self._save(episodes)
                return "already_fired"
            if not self.url:
                self._save(episodes)
                return "disabled"
            message = {"episode": key, "episode_id": st["id"], "started_at": st["started_at"],
                       **payload}
            try:
                st["attempts"] = int(st.get("attempts", 0)) + self.send(message, st["id"])
                st.update(fired=True, fired_at=now)
                outcome = "fired"
            except WebhookError as exc:
                log.error("%s", exc)
                st["attempts"] = int(st.get("attempts", 0)) + self.retries + 1
                outcome = "failed"
            self._save(episodes)
            return outcome


def alert_drift(notifier: WebhookNotifier, result: DriftResult,
                reference_until: float | None = None) -> str:
    """One episode per route: significant drift (dataset drift or any model's scores).
    `reference_until`: the end of a log reference, pinned while the episode is open."""
    payload = {
        "event": "drift", "route": result.route, "verdict": result.verdict,
        "share": result.share, "drifted_features": result.drifted_features,
        "drifted_models": result.drifted_models,
        "summary": (f"route {result.route}: drift in {len(result.drifted_features)} feature(s) "
                    f"({', '.join(result.drifted_features) or 'none'})"
                    + (f"; model scores moved: {', '.join(result.drifted_models)}"
                       if result.drifted_models else "")),
        "live": result.live, "reference": result.reference,
    }
    return notifier.observe(f"{result.route}:drift", result.significant, payload,
                            reference_until=reference_until)


def alert_guardrails(notifier: WebhookNotifier, route: str, decisions: Iterable[Any]
                     ) -> dict[str, str]:
    """One episode per challenger whose guardrails fail (latency p99, error rate).

    `decisions` are `evaluator.decision.ChallengerDecision`s (or their dicts).
    """
    out: dict[str, str] = {}
    for d in decisions:
        dd = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        guard = dd.get("guardrails") or {}
        challenger = str(dd.get("challenger"))
        failed = [c for c in guard.get("checks", []) if c.get("passed") is False]
        payload = {"event": "guardrail", "route": route, "challenger": challenger,
                   "summary": f"route {route}: challenger {challenger} breaches "
                              f"{', '.join(str(c.get('name')) for c in failed) or 'guardrails'}",
                   "checks": failed}
        out[challenger] = notifier.observe(f"{route}:guardrail:{challenger}",
                                           guard.get("status") == "fail", payload)
    return out
