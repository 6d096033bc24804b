"""The type-checking ratchet: `mypy` (the project's strict config) error counts per file may go
down, never up.

`gateway/` and `understudy/` are strict-clean and stay so with a plain `mypy understudy gateway`.
The evaluator is brought to strict module by module; until then this records how many errors
each of its modules still has (devtools/mypy_baseline.json) and fails when a module gains one
or a file outside the baseline has any, so a clean module stays clean and a change cannot add
errors anywhere. A key is a module path without `.py`: `evaluator/drift` also covers the files
of an `evaluator/drift/` package, so splitting a module into a package of the same name keeps
its allowance. When counts go down it says so; `--update` writes the lower counts (it never
raises one).

    python -m devtools.mypy_ratchet            # check (exit 1 when a count went up)
    python -m devtools.mypy_ratchet --update   # after fixing errors: record the lower counts
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BASELINE = Path(__file__).with_name("mypy_baseline.json")
DEFAULT_PATHS = ("evaluator",)
_ERROR = re.compile(r"^(?P<file>[^:\s]+\.pyi?):\d+(?::\d+)?: error: ")


def count_errors(output: str) -> Counter[str]:
    """Errors per module path (file without `.py`) in mypy's output; notes and the summary
    line are not errors."""
    counts: Counter[str] = Counter()
    for line in output.splitlines():
        m = _ERROR.match(line)
        if m:
            counts[m["file"].replace("\\", "/").rsplit(".", 1)[0]] += 1
    return counts


def by_key(counts: Mapping[str, int], keys: Sequence[str]) -> Counter[str]:
    """Counts regrouped under the baseline's keys: a module counts under its own key or under
    the longest key that is a package prefix of it; otherwise under its own path."""
    out: Counter[str] = Counter()
    for module, n in counts.items():
        covering = [k for k in keys if module == k or module.startswith(k + "/")]
        out[max(covering, key=len) if covering else module] += n
    return out


@dataclass(frozen=True)
class Comparison:
    worse: dict[str, tuple[int, int]]  # file -> (allowed, found)
    better: dict[str, tuple[int, int]]

    @property
    def ok(self) -> bool:
        return not self.worse


def compare(baseline: Mapping[str, int], counts: Mapping[str, int]) -> Comparison:
    """Files whose count rose above the baseline (absent from it: 0 allowed), and files whose
    count fell below it."""
    worse = {f: (baseline.get(f, 0), n) for f, n in counts.items() if n > baseline.get(f, 0)}
    better = {f: (n, counts.get(f, 0)) for f, n in baseline.items() if counts.get(f, 0) < n}
    return Comparison(dict(sorted(worse.items())), dict(sorted(better.items())))


def lowered(baseline: Mapping[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    """The baseline with every count that fell replaced by the new one (none raised; files at
    zero dropped)."""
    out = {f: min(n, counts.get(f, 0)) for f, n in baseline.items()}
    return {f: n for f, n in sorted(out.items()) if n}


def run_mypy(paths: Sequence[str]) -> str:
    """mypy's report on `paths` with the project's configuration (pyproject.toml)."""
    from mypy import api

    stdout, stderr, status = api.run(list(paths))
    if status not in (0, 1) or (status == 1 and not count_errors(stdout)):
        raise RuntimeError(f"mypy failed to run (exit {status}):\n{stdout}{stderr}")
    return stdout


def load_baseline(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {str(k): int(v) for k, v in data.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS),
                        help="packages or files to check (default: evaluator)")
    parser.add_argument("--baseline", type=Path, default=BASELINE,
                        help="JSON file of allowed errors per file (default: %(default)s)")
    parser.add_argument("--update", action="store_true",
                        help="write the lower counts to the baseline (never raises one)")
    args = parser.parse_args(argv)
    baseline = load_baseline(args.baseline)
    counts = by_key(count_errors(run_mypy(args.paths)), list(baseline))
    result = compare(baseline, counts)
    for f, (allowed, found) in result.worse.items():
        print(f"{f}: {found} mypy errors, {allowed} allowed", file=sys.stderr)
    for f, (was, now) in result.better.items():
        print(f"{f}: {now} mypy errors, down from {was}")
    total = sum(counts.values())
    print(f"mypy: {total} errors in {len(counts)} files (baseline {sum(baseline.values())})")
    if args.update:
        args.baseline.write_text(json.dumps(lowered(baseline, counts), indent=2) + "\n")
    elif result.better:
        print("counts went down: record them with `python -m devtools.mypy_ratchet --update`")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
