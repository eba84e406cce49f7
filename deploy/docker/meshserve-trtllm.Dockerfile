# The GPU model server: MeshServe installed into TensorRT-LLM's own environment (its wheels bring a
# CUDA torch that cannot share a virtualenv with the CPU torch pinned in pyproject.toml; README,
# "TensorRT-LLM on a GPU"). The base must carry tensorrt-llm==1.3.0rc27, the release
# services/modelserver/trtllm/api.py pins; pass it as TRTLLM_IMAGE (NVIDIA's release container
# of that version). Build from the repository root:
#   docker build -f deploy/docker/meshserve-trtllm.Dockerfile --build-arg TRTLLM_IMAGE=... \
#     -t meshserve/meshserve-trtllm:0.1.0 .
ARG TRTLLM_IMAGE
FROM ${TRTLLM_IMAGE}
ENV PIP_NO_CACHE_DIR=1
WORKDIR /opt/meshserve
COPY pyproject.toml Makefile buf.yaml ./
COPY protos protos
COPY services services
COPY deploy/envoy deploy/envoy
# Every pinned dependency except torch and transformers (TensorRT-LLM's own are kept), then the
# stubs; `python -m services.modelserver.trtllm.contract` fails the build if the installed API
# differs from the recorded one.
RUN python3 - <<'PY' > /tmp/requirements.txt
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith(("torch", "transformers"))))
PY
RUN mkdir -p gen/python/meshserve/v1 gen/python/inference \
 && touch gen/python/meshserve/__init__.py gen/python/meshserve/v1/__init__.py gen/python/inference/__init__.py \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps -e . \
 && mkdir -p build/proto-deps/google/api \
 && d="$(python3 -c 'import google.api; print(list(google.api.__path__)[0])')" \
 && cp "$d/annotations.proto" "$d/http.proto" build/proto-deps/google/api/ \
 && python3 -m grpc_tools.protoc -Iprotos -Ibuild/proto-deps --python_out=gen/python --pyi_out=gen/python \
      --grpc_python_out=gen/python $(find protos -name '*.proto') \
 && python3 -m services.modelserver.trtllm.contract
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
CMD ["meshserve", "modelserver", "--help"]
