"""The words both programs use about a request, each defined once, with their numeric codes.

The gateway writes these words into records and validates its configuration against them; the
evaluator stores them as small integers (the codes below) and names them back in reports. A
word added here is known to both programs at once, and the codes stay stable across releases
because stored data carries them.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# How a route chooses the arm that serves a request (gateway/explore/policies.py); "rollout" is
# set only by the guarded-rollout controller (gateway/control/rollout.py).
PolicyType = Literal["champion", "epsilon_greedy", "thompson", "rollout"]
POLICY_TYPES: Final[tuple[PolicyType, ...]] = get_args(PolicyType)

# How a challenger takes part: a shadow copy, or an arm that exploring policies may serve.
ChallengerMode = Literal["shadow", "explore"]
CHALLENGER_MODES: Final[tuple[ChallengerMode, ...]] = get_args(ChallengerMode)

# A model's part in one record: its role on the route, and how it saw this request.
Role = Literal["champion", "challenger"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
Mode = Literal["served", "shadow", "explore", "replay"]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)

# What became of one model's call for one request.
OutcomeStatus = Literal["ok", "error", "timeout", "shed", "skipped"]
OUTCOME_STATUSES: Final[tuple[OutcomeStatus, ...]] = get_args(OutcomeStatus)

# Which adapter carried a request (the record's `protocol`; absent in old records: "http").
Transport = Literal["http", "grpc"]
TRANSPORTS: Final[tuple[Transport, ...]] = get_args(Transport)

# What a route's model predicts, and which number of a label an exploring policy learns from.
Task = Literal["classification", "regression"]
TASKS: Final[tuple[Task, ...]] = get_args(Task)
RewardSource = Literal["correct", "label", "reward"]
REWARD_SOURCES: Final[tuple[RewardSource, ...]] = get_args(RewardSource)

# Stored codes (the evaluator's columns). Stable: stored data carries them.
STATUS_CODES: Final[dict[str, int]] = {"ok": 0, "error": 1, "timeout": 2, "shed": 3,
                                       "skipped": 4}
ROLE_CODES: Final[dict[str, int]] = {"champion": 0, "challenger": 1}
MODE_CODES: Final[dict[str, int]] = {"served": 0, "shadow": 1, "explore": 2, "replay": 3}
UNKNOWN_MODE: Final = -1  # a mode this release does not know (a newer or foreign writer)
ROLE_NAMES: Final[dict[int, str]] = {code: name for name, code in ROLE_CODES.items()}
MODE_NAMES: Final[dict[int, str]] = {code: name for name, code in MODE_CODES.items()}
