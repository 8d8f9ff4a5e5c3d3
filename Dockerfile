# routerd as a container image: small, non-root, its templates inside.
#
# Targets:
#   routerd        (default) the sidecar: nginx runs in its own container;
#                  routerd renders into a folder the two share and signals
#                  the master through its pid file (shared PID namespace).
#   routerd-nginx  routerd and nginx in one container: `routerd run
#                  --supervise` starts nginx itself.
#
# Both hold an nginx binary: the sidecar runs `nginx -t` on every candidate
# before nginx sees it, so it must be the same build the nginx container runs.
# Only the binary is copied: dynamic modules (the Lua module that
# --dynamic-backends uses) come with BASE, so use a BASE that has that nginx
# and its modules installed, and the same image as NGINX_IMAGE.
#
# Build arguments:
#   BASE         an image with Python >= 3.11 (a Debian-like one by default)
#   NGINX_IMAGE  the image whose nginx is used: an official one by default,
#                or your own build (extra modules, patched OpenSSL)
#   NGINX_BIN    where the binary is inside NGINX_IMAGE
#   WHEELS       a folder of wheels inside the build context: install routerd
#                and its dependencies from it, with no package index
#
#   docker build -t routerd .
#   docker build --target routerd-nginx -t routerd:nginx .
#   docker build --build-arg NGINX_IMAGE=registry.example/nginx:1.27-custom \
#                --build-arg NGINX_BIN=/usr/local/nginx/sbin/nginx -t routerd .
#   pip wheel -w build/wheels . && \
#     docker build --build-arg WHEELS=build/wheels -t routerd .   (offline)

ARG BASE=python:3.11.13-slim-bookworm
ARG NGINX_IMAGE=nginx:1.27.5-bookworm

# COPY --from takes no build argument: name the nginx image as a stage.
FROM ${NGINX_IMAGE} AS nginx

# ---------------------------------------------------------------- build
FROM ${BASE} AS build
ARG WHEELS=
WORKDIR /src
COPY . .
# One virtual environment at /opt/routerd, copied whole into the runtime
# stages (same BASE, so the same interpreter path). pip and setuptools are
# not needed at run time.
RUN python3 -m venv /opt/routerd \
 && if [ -n "$WHEELS" ]; then \
        /opt/routerd/bin/pip install --no-cache-dir --no-index \
            --find-links "/src/$WHEELS" routerd; \
    else \
        /opt/routerd/bin/pip install --no-cache-dir /src; \
    fi \
 && install -m 0755 deploy/docker/healthcheck.py /opt/routerd/bin/routerd-healthcheck \
 && /opt/routerd/bin/pip uninstall --yes --quiet pip setuptools \
 && /opt/routerd/bin/routerd --version

# -------------------------------------------------------------- runtime
# Metadata first and the venv last, so a change to routerd rebuilds little.
FROM ${BASE} AS runtime
ARG NGINX_BIN=/usr/sbin/nginx
LABEL org.opencontainers.image.title="routerd" \
      org.opencontainers.image.description="nginx configuration sidecar: etcd in, validated and confirmed nginx reloads out" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/routerd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ROUTERD_NGINX_BIN=/usr/local/sbin/nginx \
    ROUTERD_NGINX_CONF=/var/lib/routerd/nginx.conf \
    ROUTERD_HTTP_LISTEN=0.0.0.0:8080 \
    ROUTERD_HTTPS_LISTEN=0.0.0.0:8443 \
    ROUTERD_METRICS_LISTEN=0.0.0.0:9145
WORKDIR /var/lib/routerd
EXPOSE 9145
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/routerd/bin/python", "/opt/routerd/bin/routerd-healthcheck", "/healthz"]
ENTRYPOINT ["routerd"]
CMD ["run"]
COPY --from=nginx ${NGINX_BIN} /usr/local/sbin/nginx
# uid 10001: the nginx container runs as the same user, so routerd may
# signal its master and both may write the shared folder. /var/lib/routerd
# is that folder: nginx.conf, routerd's files, nginx's pid, log and temp.
# `nginx -V` fails the build when the binary cannot run on BASE (a custom
# build that needs libraries BASE lacks).
RUN groupadd --system --gid 10001 routerd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/routerd --shell /usr/sbin/nologin routerd \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/routerd \
 && /usr/local/sbin/nginx -V
COPY --from=build /opt/routerd /opt/routerd
USER 10001:10001

# ----------------------------------------------- routerd and nginx, one container
FROM runtime AS routerd-nginx
ENV ROUTERD_SUPERVISE=true
EXPOSE 8080 8443

# ------------------------------------------------ the sidecar (default target)
FROM runtime AS routerd
ENV ROUTERD_NGINX_PID_FILE=/var/lib/routerd/nginx.pid
