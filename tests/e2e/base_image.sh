#!/usr/bin/env bash
# Make the e2e tests' base image without a registry: a minbase Debian bookworm
# from debootstrap, with Python 3.11, nginx and etcd, imported with
# `docker import`. It stands in for python:3.11-slim-bookworm (BASE), the
# official nginx image (NGINX_IMAGE, the nginx container) and etcd's image.
#
#   usage: base_image.sh TAG        (as root; needs debootstrap and docker)
#
# The caller caches the image by TAG; this script always builds.
set -euo pipefail

tag=${1:?usage: base_image.sh TAG}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=python3,python3-venv,nginx,etcd-server,etcd-client,ca-certificates

root=$(mktemp -d "${TMPDIR:-/var/tmp}/routerd-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"  # the image's / (mktemp made it 0700: no user but root could run anything)

# Packages' maintainer scripts never start a service inside debootstrap (it
# replaces start-stop-daemon while it installs), so nothing binds a host port.
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 40 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# No caches, docs or logs in the image (and no service configs that listen).
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/etc/nginx/sites-enabled/*
find "$root"/var/log -type f -delete

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap minbase bookworm + ${packages}" \
    - "$tag" >/dev/null
echo "$tag"
