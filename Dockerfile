# syntax=docker/dockerfile:1
# Rower in a container: one image for every role (`agent`, `balancer`, `sim`, `dashboard`).
#
#   docker build -t rower .
#   docker run --rm rower --version
#   docker run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:8085:8085 \
#       -e HEALTHCHECK_URL=http://127.0.0.1:8085/health \
#       rower balancer --management-addr 0.0.0.0:8085 --reverseproxy-addr 0.0.0.0:8080
#
# Flags can also be given as ROWER_* variables (ROWER_MANAGEMENT_ADDR=...). See docs/deploy/.

# Pinned by tag; pin by digest too (python:3.11.14-slim-bookworm@sha256:...) for builds that
# must be reproducible byte for byte.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- 1. build the wheel --------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN pip install --no-cache-dir --disable-pip-version-check build==1.6.1
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN python -m build --wheel --outdir /dist .

# --- 2. the runtime image: the wheel and its dependencies, nothing else ---------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install /dist/*.whl \
    && groupadd --system --gid 10001 rower \
    && useradd --system --uid 10001 --gid rower --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin rower
USER 10001:10001

# The ports the examples use: 8080 reverse proxy (balancer) or llama.cpp API (sim),
# 8085 management (agents, API, dashboard, metrics).
EXPOSE 8080 8085

# Only the balancer and `rower sim` serve HTTP; the agent has no endpoint, so the check is
# opt-in: set HEALTHCHECK_URL (e.g. http://127.0.0.1:8085/health for a balancer) and it must
# answer 2xx. Left empty (agents, dashboards) the check passes while the process runs.
ENV HEALTHCHECK_URL=""
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; url = os.environ.get('HEALTHCHECK_URL'); url and urllib.request.urlopen(url, timeout=4)"]

ENTRYPOINT ["rower"]
CMD ["--help"]
