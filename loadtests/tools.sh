# Sourced by loadtests/bench.sh and loadtests/load.sh: make sure the load tools exist.
# A fresh machine lacks wrk and nginx: install them with apt-get (as root, or via sudo).
# py-spy (profiling) goes into the virtualenv; without it the profile step is skipped.

ensure_tools() {
  local need=()
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
  command -v taskset >/dev/null 2>&1 || need+=(util-linux)
  if ((${#need[@]})); then
    echo "installing ${need[*]} with apt-get" >&2
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
      if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
        echo "need root (or sudo) to apt-get install ${need[*]}" >&2; return 2
      fi
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

ensure_py_spy() {
  "$PY" -m pip show py-spy >/dev/null 2>&1 \
    || "$PY" -m pip install --quiet py-spy \
    || echo "py-spy could not be installed: the profile step will be skipped" >&2
}
