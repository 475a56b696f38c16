# Image for buildkit-cache-exporter and buildkit-cache-actuator (one image, two commands).
#   docker build -t buildkit-cache-exporter .
# It runs as an unprivileged user by default (fine for the actuator, which only needs the Docker
# socket: --group-add <gid of /var/run/docker.sock>). The exporter walks state volumes under
# /var/lib/docker, which only root can read: deploy/docker-compose.yml runs it as root.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY buildkit_cache ./buildkit_cache
COPY exporter ./exporter
COPY actuator ./actuator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
# Remote builders (builders.<name>.address) need a local buildctl; add one if you use them:
#   COPY --from=moby/buildkit:v0.17.0 /usr/bin/buildctl /usr/local/bin/buildctl
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin buildkit-cache
USER 10001
EXPOSE 9862 9863
ENTRYPOINT ["buildkit-cache-exporter"]
CMD ["--config", "/etc/buildkit-cache/config.yml"]
