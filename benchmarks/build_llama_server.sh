#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench (a native build for this CPU) from the llama.cpp
# source vendored in the llama-cpp-python sdist on PyPI, into benchmarks/.llama.cpp/bin/.
# Takes about 10 minutes on 2 cores; needs cmake and a C++ compiler. Prints the bin folder.
set -euo pipefail
cd "$(dirname "$0")"
out="$PWD/.llama.cpp"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
if [ ! -x "$out/bin/llama-server" ]; then
  mkdir -p "$out/src"
  ../.venv/bin/pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$version" -d "$out/src"
  tar -xzf "$out/src/llama_cpp_python-$version.tar.gz" -C "$out/src"
  cmake -S "$out/src/llama_cpp_python-$version/vendor/llama.cpp" -B "$out/build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$out/build" --target llama-server llama-bench -j "$(nproc)" >/dev/null
  mkdir -p "$out/bin"
  cp "$out/build/bin/llama-server" "$out/build/bin/llama-bench" "$out/bin/"
  cp "$out"/build/bin/*.so* "$out/bin/" 2>/dev/null || true
fi
echo "$out/bin"
