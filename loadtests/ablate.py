"""Make gateway trees with one piece of per-request work switched off, to measure what it costs.

    python loadtests/ablate.py --out var/bench/ablate norecord nocopies norecord+nocopies
    python loadtests/cpu_split.py --rates 600 --rounds 4 --together --no-nginx \\
        --tree main=. --tree norecord=var/bench/ablate/norecord ...

Each tree is this checkout's packages (symlinked) plus a `sitecustomize.py` that patches one
thing as the gateway starts (`cpu_split.py --tree` puts the tree first on PYTHONPATH); names
joined by "+" patch all of them in one tree (what the pieces cost together, or what is left
without them). For measurement only: an ablated gateway is not correct (no records, no
copies...). Ablations:
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import common


def _lane_setting(name: str, value: object) -> str:
    """The body of a `_patch()` that makes every shadow lane start with `name=value`."""
    return ("from gateway.mirror import shadow\n"
            "_init = shadow.ShadowLane.__init__\n"
            "def __init__(self, *args, **kwargs):\n"
            f"    kwargs[{name!r}] = {value!r}\n"
            "    _init(self, *args, **kwargs)\n"
            "shadow.ShadowLane.__init__ = __init__\n")


# name -> (what it switches off, the body of `_patch()`)
ABLATIONS: dict[str, tuple[str, str]] = {
    "norecord": ("no inference record (Recorder.submit does nothing)",
                 "from gateway.dataplane import recorder\n"
                 "recorder.Recorder.submit = lambda self, ctx, copies: None\n"),
    "nocopies": ("no shadow copies (the route keeps its challenger; none is dispatched)",
                 "from gateway.dataplane import service\n"
                 "service.InferenceService._dispatch_copies = lambda self, *args: {}\n"),
    "novalidate": ("no validation of the request against the model's inputs",
                   "from gateway.dataplane import service\n"
                   "service.validate_against = lambda *args: None\n"),
    "nometrics": ("no Prometheus updates (inc/observe/set are no-ops)",
                  "import prometheus_client.metrics as m\n"
                  "from gateway import metrics as gm\n"
                  "for cls, names in ((m.Counter, ['inc']), (m.Histogram, ['observe']),\n"
                  "                   (m.Gauge, ['set', 'inc', 'dec']),\n"
                  "                   (gm.BatchedHistogram, ['observe'])):\n"
                  "    for name in names:\n"
                  "        setattr(cls, name, lambda self, *args, **kwargs: None)\n"),
    "nodecode": ("the record does not decode the models' answers (outputs left empty)",
                 "from gateway.dataplane import recorder\n"
                 "recorder.decode_response = lambda *args: {'outputs': {}}\n"),
    "nobatch": ("no micro-batching of shadow copies (every copy its own call)",
                _lane_setting("batch_max_rows", 1)),
    "nowait": ("copies batched without a window (batch_max_wait_ms 0: the copies of one loop "
               "iteration share a call, and no timer wakes the loop for a window's end)",
               _lane_setting("batch_max_wait_ms", 0.0)),
    "noprobe": ("no latency probes (latency_probe_every 0: every batchable copy is batched)",
                _lane_setting("latency_probe_every", 0)),
    "loopwrite": ("the file sink writes on the event loop (a timer per flush interval) "
                  "instead of its writer thread",
                  "import asyncio\n"
                  "from gateway.backends import file_sink\n"
                  "async def start(self):\n"
                  "    self.root.mkdir(parents=True, exist_ok=True)\n"
                  "    self._loop = asyncio.get_running_loop()\n"
                  "file_sink.FileSink.start = start\n"
                  "_emit = file_sink.FileSink.emit\n"
                  "def emit(self, stream, key, value):\n"
                  "    first = self._buffered == 0\n"
                  "    _emit(self, stream, key, value)\n"
                  "    if first:\n"
                  "        self._loop.call_later(self.flush_interval, self._write_pending, False)\n"
                  "file_sink.FileSink.emit = emit\n"),
    "deferrecords": ("records built in bulk every 10 ms instead of as each becomes ready",
                     "import asyncio\n"
                     "from gateway.dataplane import recorder\n"
                     "def _push(self, ctx, copies):\n"
                     "    self._ready.append((ctx, copies))\n"
                     "    if self._slice is None:\n"
                     "        if self._loop is None or self._loop.is_closed():\n"
                     "            self._loop = asyncio.get_running_loop()\n"
                     "        self._slice = self._loop.call_later(0.010, self._work)\n"
                     "recorder.Recorder._push = _push\n"),
    "nogc": ("no cyclic garbage collection",
             "import gc\n"
             "gc.set_threshold(0)\n"
             "gc.freeze = lambda: None\n"
             "gc.collect = lambda *args: 0\n"),
}
__doc__ += "".join(f"\n- {name}: {what}" for name, (what, _) in ABLATIONS.items()) + "\n"

# The patch runs when `gateway.cli` is first imported: the packages exist, nothing started.
SITECUSTOMIZE = '''"""Written by loadtests/ablate.py: {what}."""
import importlib.abc
import sys


def _patch():
{body}
''' + common.PATCH_AT_GATEWAY_IMPORT  # no braces: safe for str.format
LINKED = ("gateway", "understudy", "evaluator", "configs", "pyproject.toml")


def make_tree(out: Path, name: str) -> Path:
    """`out/name`: the checkout with the ablation `name` (or "a+b+...": each of them)."""
    parts = [ABLATIONS[part] for part in name.split("+")]
    what = "; ".join(what for what, _ in parts)
    # Each part in its own function scope: two parts may name the same thing (`_init`).
    body = parts[0][1] if len(parts) == 1 else "".join(
        "def _part():\n" + "".join(f"    {line}\n" for line in part.splitlines()) + "_part()\n"
        for _, part in parts)
    tree = out / name
    tree.mkdir(parents=True, exist_ok=True)
    for entry in LINKED:
        link = tree / entry
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(common.ROOT / entry)
    indented = "".join(f"    {line}\n" for line in body.splitlines())
    (tree / "sitecustomize.py").write_text(SITECUSTOMIZE.format(what=what, body=indented))
    return tree


def _ablation(name: str) -> str:
    """An ablation's name, or several joined by "+"; an unknown part is refused by name."""
    unknown = [part for part in name.split("+") if part not in ABLATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ablation(s) {', '.join(unknown)}; "
                                         f"choose from {', '.join(sorted(ABLATIONS))}")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ablations", nargs="+", type=_ablation,
                        help=f"{', '.join(sorted(ABLATIONS))}, or several joined by '+'")
    parser.add_argument("--out", type=Path, default=common.ROOT / "var" / "bench" / "ablate")
    args = parser.parse_args(argv)
    trees = [f"--tree {name}={make_tree(args.out.resolve(), name)}" for name in args.ablations]
    print("python loadtests/cpu_split.py --rates 600 --rounds 4 --together --no-nginx "
          "--tree main=. " + " ".join(trees))
    return 0


if __name__ == "__main__":
    sys.exit(main())
