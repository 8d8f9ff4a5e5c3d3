#!/usr/bin/env bash
# The routerd demo on a fresh Debian 12 machine, as root: install etcd, nginx
# (with its Lua module), Docker and routerd, then run deploy/demo.py, which
# prints every step as it goes. Everything runs on loopback, in a temporary
# folder that is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null || ! command -v nginx >/dev/null || ! command -v dockerd >/dev/null; then
    echo "==> installing etcd, nginx, Docker (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends etcd-server etcd-client nginx \
        libnginx-mod-http-lua docker.io busybox-static python3 python3-venv >/dev/null
fi
# The packaged nginx may have started on port 80; the demo runs its own.
pkill -QUIT -f '^nginx: master process /usr/sbin/nginx$' 2>/dev/null || true

if ! docker info >/dev/null 2>&1; then
    echo "==> starting dockerd (no bridge network here: containers use the host network)"
    nohup dockerd --iptables=false --bridge=none --storage-driver=vfs \
        >/var/log/routerd-demo-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
fi

VENV=${VENV:-/opt/routerd-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "==> installing routerd into $VENV"
python -m pip install -q --upgrade pip
python -m pip install -q -e .

exec python deploy/demo.py "$@"
