# Image for buildkit-cache-exporter and buildkit-cache-actuator (one image, two commands).
#   docker build -t buildkit-cache-exporter .
# Plain Dockerfile syntax: it builds with `docker build` on Docker 20.10 and later, with BuildKit or
# with the legacy builder alike. It runs as an unprivileged user (uid 10001) by default: fine for the
# actuator, which only needs the Docker socket (--group-add <gid of /var/run/docker.sock>). The
# exporter walks state volumes under /var/lib/docker, which only root can read:
# deploy/docker-compose.yml runs it as root.
#
# Build arguments, all optional:
#   --build-arg BASE=<image>            a Python 3.11+ base image with python3 -m venv (default below)
#   --build-arg BUILDKIT=<image>        where buildctl comes from (/usr/bin/buildctl of that image):
#                                       remote and sidecar builders (builders.<key>.address) need it
# To build without a package index, put wheels in ./wheelhouse first (`pip wheel -w wheelhouse .`
# for the base image's Python): when that folder holds any, only they are installed.
ARG BASE=python:3.12-slim
ARG BUILDKIT=moby/buildkit:v0.32.2

FROM ${BUILDKIT} AS buildkit

FROM ${BASE}
COPY --from=buildkit /usr/bin/buildctl /usr/local/bin/buildctl
COPY . /tmp/src
RUN set -e; \
    python3 -m venv /opt/buildkit-cache; \
    if ls /tmp/src/wheelhouse/*.whl >/dev/null 2>&1; then \
        /opt/buildkit-cache/bin/pip install --no-cache-dir --no-index --find-links /tmp/src/wheelhouse buildkit-cache-exporter; \
    else \
        /opt/buildkit-cache/bin/pip install --no-cache-dir /tmp/src; \
    fi; \
    rm -rf /tmp/src
# A copy of GNU du with the file capability cap_dac_read_search (set as its xattr; the base has no
# setcap): a sidecar run as a non-root user and given CAP_DAC_READ_SEARCH reads a rootless buildkitd's
# whole state with it (other users' 0700 directories). Without that capability the kernel will not
# run it, and the exporter uses plain du (docs/how-it-works.md, "Rootless buildkitd").
RUN install -d /usr/local/libexec/buildkit-cache \
 && cp "$(command -v du)" /usr/local/libexec/buildkit-cache/du \
 && python3 -c 'import os, struct; os.setxattr("/usr/local/libexec/buildkit-cache/du", "security.capability", struct.pack("<5I", 0x02000001, 1 << 2, 0, 0, 0))'
# The audit and state folders belong to the actuator's user: a fresh named volume mounted there takes its owner.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin buildkit-cache \
 && install -d -o 10001 -g 10001 -m 0750 /var/log/buildkit-cache-actuator /var/lib/buildkit-cache-actuator
ENV PATH=/opt/buildkit-cache/bin:$PATH
USER 10001
EXPOSE 9862 9863
# Whichever program the container runs, on the address its config gives (buildkit_cache/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "-m", "buildkit_cache.healthcheck"]
ENTRYPOINT ["buildkit-cache-exporter"]
CMD ["--config", "/etc/buildkit-cache/config.yml"]
