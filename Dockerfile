# Image for buildkit-cache-exporter and buildkit-cache-actuator (one image, two commands).
#   docker build -t buildkit-cache-exporter .
# It runs as an unprivileged user (uid 10001) by default: fine for the actuator, which only needs the
# Docker socket (--group-add <gid of /var/run/docker.sock>). The exporter walks state volumes under
# /var/lib/docker, which only root can read: deploy/docker-compose.yml runs it as root.
#
# Build arguments and contexts, all optional:
#   --build-arg BASE=<image>           a Python 3.11+ base image with python3 -m venv (default below)
#   --build-context wheelhouse=<dir>   install from these wheels only, no package index: make them
#                                      with `pip wheel -w <dir> .` for the base image's Python
#   --build-context buildctl=docker-image://moby/buildkit:v0.17.0
#                                      add buildctl, which remote builders (builders.<key>.address) need
ARG BASE=python:3.12-slim

FROM scratch AS wheelhouse
FROM scratch AS buildctl

FROM ${BASE}
RUN --mount=type=bind,target=/context \
    --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    set -e; \
    cp -r /context /tmp/src; \
    python3 -m venv /opt/buildkit-cache; \
    if [ -n "$(ls -A /wheelhouse)" ]; then \
        /opt/buildkit-cache/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse buildkit-cache-exporter; \
    else \
        /opt/buildkit-cache/bin/pip install --no-cache-dir /tmp/src; \
    fi; \
    rm -rf /tmp/src
RUN --mount=type=bind,from=buildctl,target=/buildctl \
    if [ -x /buildctl/usr/bin/buildctl ]; then cp /buildctl/usr/bin/buildctl /usr/local/bin/buildctl; fi
# The audit and state folders belong to the actuator's user: a fresh named volume mounted there takes its owner.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin buildkit-cache \
 && install -d -o 10001 -g 10001 -m 0750 /var/log/buildkit-cache-actuator /var/lib/buildkit-cache-actuator
ENV PATH=/opt/buildkit-cache/bin:$PATH
USER 10001
EXPOSE 9862 9863
ENTRYPOINT ["buildkit-cache-exporter"]
CMD ["--config", "/etc/buildkit-cache/config.yml"]
