#!/usr/bin/env bash
# Build routerd-demo-app:1 without a registry: a `docker import` of a rootfs
# holding Debian's static busybox, whose httpd serves "<app> <release>
# $MESSAGE" on $PORT, as an app on a Heroku-like platform would.
set -euo pipefail
IMAGE=${1:-routerd-demo-app:1}
docker image inspect "$IMAGE" >/dev/null 2>&1 && exit 0
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/www" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for tool in sh httpd mkdir echo; do ln -s busybox "$root/bin/$tool"; done
cat > "$root/start.sh" <<'SCRIPT'
#!/bin/sh
mkdir -p /www
echo "${ROUTERD_APP} ${ROUTERD_RELEASE} ${MESSAGE}" > /www/index.html
exec httpd -f -p "$PORT" -h /www
SCRIPT
chmod +x "$root/start.sh"
tar -C "$root" -c . | docker import --change 'CMD ["/start.sh"]' - "$IMAGE" >/dev/null
echo "built $IMAGE"
