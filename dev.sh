#!/usr/bin/env bash
# Set-up and entry points for a Debian 12 machine, run as root:
#   ./dev.sh serve   install what is missing, then run the daemon with the default config
#   ./dev.sh test    install what is missing, then lint, type-check and run the test suite
# Installing is idempotent: apt packages (runc, containerd for its ctr client, ...) and a
# virtualenv in .venv with the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  runc                 # the OCI runtime our shim drives
  containerd           # for its `ctr` client, and as the reference daemon in benchmarks
  busybox-static       # test images are built from it
  zstd
  iproute2
  containernetworking-plugins   # bridge, host-local, loopback, portmap for container networks
  iptables iputils-ping util-linux
  docker-registry skopeo openssl  # a local registry, another registry client, test CAs
  python3 python3-venv python3-dev
  gcc
)

need_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  # kubectl is the SPDY/WebSocket client of the CRI streaming tests; a machine that has one
  # already (e.g. from the Google Cloud SDK) keeps it, as Debian's package would clash.
  command -v kubectl >/dev/null || dpkg-query -W -f='${Status}' kubernetes-client 2>/dev/null \
    | grep -q "install ok installed" || missing+=(kubernetes-client)
  if ((${#missing[@]})); then
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian's containerd package starts its own service on a fresh machine: ours must not
  # share its paths, and tests start containerd themselves on private sockets when needed.
  if command -v systemctl >/dev/null && systemctl is-active --quiet containerd 2>/dev/null; then
    systemctl stop containerd || true
  fi
}

need_venv() {
  local py=${PYTHON:-python3}
  if [[ ! -x .venv/bin/python ]]; then
    "$py" -m venv .venv
  fi
  local stamp=.venv/.installed
  if [[ ! -f $stamp || pyproject.toml -nt $stamp || -n $(find protos -newer "$stamp" -name '*.proto' -print -quit) ]]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e ".[test]"
    touch "$stamp"
  fi
  # The editable install leaves our modules uncompiled, and with PYTHONDONTWRITEBYTECODE
  # set (as on some CI machines) every daemon, shim and pcd start compiled them again:
  # ~130 ms of each start-up. Only changed files are recompiled here.
  .venv/bin/python -m compileall -q -j 0 pycontainerd plugins >/dev/null
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    need_apt
    need_venv
    exec .venv/bin/pycontainerd serve "$@"
    ;;
  test)
    need_apt
    need_venv
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy
    exec .venv/bin/pytest "$@"
    ;;
  setup)
    need_apt
    need_venv
    ;;
  *)
    echo "usage: $0 serve [pycontainerd serve flags] | test [pytest args] | setup" >&2
    exit 2
    ;;
esac
