#!/usr/bin/env python3
"""Build (once) and locate the helm binary that renders and lints deploy/helm/understudy.

    python -m devtools.helm build [--version V] [--verbose]   # prints the binary's path
    python -m devtools.helm path  [--version V]               # exit 1 if not built yet

Why it looks like this:

- **Where helm comes from.** No prebuilt binary can be downloaded here, only packages from the
  registries; helm is a Go module, so the machine's Go builds it:
  `go install helm.sh/helm/v4/cmd/helm@<version>` with `CGO_ENABLED=0` (a static binary, as the
  release builds are) and the version stamped in with `-ldflags -X`. The binary lands in
  `~/.cache/understudy/helm-<version>/bin/helm`, next to the cached Kafka jars, and every later
  run reuses it. Go's own module and build caches (`go env GOMODCACHE GOCACHE`) are reused too.
- **Build time.** Measured on these 2-core machines (docs/DEPLOY.md, "Helm"): a cold build (empty
  module and build caches) takes minutes, so `tests/run.sh` builds it before pytest starts, and
  the chart tests call `ensure()` too (a no-op once cached) with a timeout that covers a cold build.
- **Which version.** v4.3.2 by default (override with `--version` or `UNDERSTUDY_HELM_VERSION`).
- **A finished build is marked** by `.complete` (written after `helm version` printed the
  expected version), and a file lock serialises concurrent builds, so an interrupted build is
  redone rather than half-used.

Importable: `ensure()` returns the binary's path or raises `HelmBuildError`.
Standard library only, like the Kafka script, so it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devtools.kafka_broker import cache_root

DEFAULT_VERSION = os.environ.get("UNDERSTUDY_HELM_VERSION", "v4.3.2")
MODULE = "helm.sh/helm/v4"
BUILD_TIMEOUT_S = 3600
GO_INSTALL_DIR = "/usr/local/go/bin"


class HelmBuildError(RuntimeError):
    """helm could not be built; the message carries Go's output."""


def home(version: str = DEFAULT_VERSION, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / f"helm-{version}"


def binary(version: str = DEFAULT_VERSION, cache: Path | None = None) -> Path:
    return home(version, cache) / "bin" / "helm"


def is_built(version: str = DEFAULT_VERSION, cache: Path | None = None) -> bool:
    return (home(version, cache) / ".complete").exists()


def ensure(version: str = DEFAULT_VERSION, cache: Path | None = None, quiet: bool = True) -> Path:
    """Build helm into the cache unless it is there, and return the binary's path."""
    root = home(version, cache)
    if is_built(version, cache):
        return binary(version, cache)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(version, cache):
            return binary(version, cache)
        # Go's standard install directory too: a non-interactive shell (CI) may not have it on
        # PATH when only a shell profile adds it.
        go = shutil.which("go") or shutil.which("go", path=GO_INSTALL_DIR)
        if go is None:
            raise HelmBuildError(f"Go (go) is neither on PATH nor in {GO_INSTALL_DIR}; "
                                 "it is needed to build helm")
        staging = root / "bin.partial"
        shutil.rmtree(staging, ignore_errors=True)
        env = {**os.environ, "GOBIN": str(staging), "CGO_ENABLED": "0", "GOTOOLCHAIN": "local",
               "GOFLAGS": "-buildvcs=false"}
        ldflags = f"-s -w -X {MODULE}/internal/version.version={version}"
        cmd = [go, "install", "-ldflags", ldflags, f"{MODULE}/cmd/helm@{version}"]
        try:
            proc = subprocess.run(cmd, env=env, cwd=root, capture_output=quiet, text=True,
                                  timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HelmBuildError(f"building helm {version} took over {BUILD_TIMEOUT_S} s") from exc
        if proc.returncode != 0:
            detail = (proc.stderr or "")[-4000:] if quiet else ""
            raise HelmBuildError(f"go install {MODULE}/cmd/helm@{version} failed "
                                 f"({proc.returncode})\n{detail}")
        built = staging / "helm"
        shown = subprocess.run([str(built), "version", "--short"], capture_output=True,
                               text=True, timeout=60, check=False).stdout.strip()
        if not shown.startswith(version):
            raise HelmBuildError(f"{built} reports version {shown!r}, expected {version}")
        shutil.rmtree(root / "bin", ignore_errors=True)
        staging.rename(root / "bin")
        (root / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return binary(version, cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build helm into the cache (no-op when cached)")
    p_path = sub.add_parser("path", help="print the cached binary's path; exit 1 if not built")
    for p in (p_build, p_path):
        p.add_argument("--version", default=DEFAULT_VERSION)
    p_build.add_argument("--verbose", action="store_true", help="show Go's output")
    args = parser.parse_args(argv)
    if args.command == "path":
        if not is_built(args.version):
            print(f"helm {args.version} is not built: python -m devtools.helm build",
                  file=sys.stderr)
            return 1
        print(binary(args.version))
        return 0
    began = time.monotonic()
    if not is_built(args.version):
        print(f"building helm {args.version} from its Go module (minutes on a cold cache)...",
              file=sys.stderr)
    try:
        path = ensure(args.version, quiet=not args.verbose)
    except HelmBuildError as exc:
        print(f"helm: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({time.monotonic() - began:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
