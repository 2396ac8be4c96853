# syntax=docker/dockerfile:1
#
# egressproxy's container image.  docs/deployment.md ("The container image")
# says how to build, run and configure it; deploy/test-image checks it.
#
# Anywhere with network access:
#   docker build -t egressproxy .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/egressproxy:TAG --push .
# Without network access (pip cannot reach the index from inside the build):
#   deploy/build-image TAG
# which makes the base with mmdebstrap and puts pre-built wheels in wheels/.
#
# BASE is the base of both stages, so that the virtual environment built in
# the first runs on the Python of the second: python3 (3.10 or later) on
# PATH, or apt to install Debian's (debian:bookworm-slim has no python3).
# Building the wheels here also needs Python's ensurepip (Debian:
# python3-venv, installed with apt if missing).
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Python, from Debian unless the base has it.
RUN set -eu; \
    if ! command -v python3 >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3; \
        rm -rf /var/lib/apt/lists/*; \
    fi
# wheels/ is empty in the repository (but for its README): the wheels are
# then built here, from PyPI.  deploy/build-image fills it beforehand, with
# egressproxy's wheel, every dependency's and pip's, so that this stage
# needs no network.
COPY wheels/ /wheels/
COPY pyproject.toml setup.cfg README.md /src/
COPY proxy_app/ /src/proxy_app/
COPY twisted/ /src/twisted/
# pip runs from its wheel, so that the runtime environment gets no pip.
# Test suites are not needed to run the proxy (Twisted's are 20 MB).
# Bytecode is compiled as unchecked-hash .pyc files, valid whatever the
# sources' timestamps become in the image's layers, and never rewritten.
# Twisted keeps the list of twistd's plugins in dropin.cache and rewrites it
# when a plugin file is newer than it: every file gets one whole-second
# timestamp a minute back, then the cache is written, so that nothing is
# written at run time and a read-only root logs no "Unable to write to
# plugin cache".  The build fails if the egressproxy plugin is not found.
RUN set -eu; \
    if ! ls /wheels/*.whl >/dev/null 2>&1; then \
        if ! python3 -c 'import ensurepip' 2>/dev/null; then \
            apt-get update; \
            apt-get install -y --no-install-recommends python3-venv; \
            rm -rf /var/lib/apt/lists/*; \
        fi; \
        python3 -m venv /opt/pip; \
        /opt/pip/bin/pip wheel --wheel-dir /wheels /src pip; \
    fi; \
    python3 -m venv --without-pip /opt/egressproxy; \
    /opt/egressproxy/bin/python "$(ls /wheels/pip-*.whl | tail -n 1)/pip" install \
        --no-index --find-links /wheels --no-cache-dir --no-compile egressproxy; \
    find /opt/egressproxy/lib -depth -type d \( -name test -o -name tests \) \
        -path '*/site-packages/*' -exec rm -rf {} +; \
    rm -f /opt/egressproxy/bin/activate* /opt/egressproxy/bin/Activate.ps1; \
    /opt/egressproxy/bin/python -m compileall -q -j 0 \
        --invalidation-mode unchecked-hash /opt/egressproxy/lib; \
    find /opt/egressproxy -exec touch -h -d "@$(( $(date +%s) - 60 ))" {} +; \
    /opt/egressproxy/bin/python -c "\
from twisted.plugin import IPlugin, getPlugins; \
from twisted.application.service import IServiceMaker; \
list(getPlugins(IPlugin)); \
assert 'egressproxy' in [p.tapname for p in getPlugins(IServiceMaker)]"; \
    ls -l /opt/egressproxy/lib/python3*/site-packages/twisted/plugins/dropin.cache

FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
# Python, unless the base has it; and the fixed UID and GID, named for tools
# that look them up.
RUN set -eu; \
    if ! command -v python3 >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    echo 'egressproxy:x:65532:65532:egressproxy:/nonexistent:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'egressproxy:x:65532:' >> /etc/group
COPY --from=build /opt/egressproxy/ /opt/egressproxy/
COPY deploy/image/healthcheck.py /opt/egressproxy/healthcheck.py
COPY deploy/image/egressproxy.yaml /etc/egressproxy/egressproxy.yaml
LABEL org.opencontainers.image.title="egressproxy" \
      org.opencontainers.image.description="An egress proxy that keeps outbound HTTP away from the private network (SSRF, DNS rebinding)." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE}"

# A container must listen on all its interfaces to be reached at all.
# These variables win over `listen` and `metrics` in the mounted
# egressproxy.yaml (flag > environment > file); set one to the empty string
# (-e EGRESSPROXY_LISTEN=) to take the file's instead.
ENV PATH=/opt/egressproxy/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EGRESSPROXY_LISTEN=tcp:9090:interface=0.0.0.0 \
    EGRESSPROXY_METRICS=tcp:2112:interface=0.0.0.0 \
    EGRESSPROXY_CONFIG=/etc/egressproxy/egressproxy.yaml
EXPOSE 9090 2112
USER 65532:65532
WORKDIR /
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/egressproxy/bin/python", "/opt/egressproxy/healthcheck.py"]
# --pidfile= : no pid file to write (or to find stale on a restart).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "egressproxy"]
