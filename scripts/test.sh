#!/usr/bin/env bash
# The full check, as CI runs it:
#   1. Release build in build/: unit tests and examples through ctest (labels unit, example)
#   2. ASan + UBSan Debug build of the tests in build-asan/: unit tests through ctest
#   3. every public header compiled alone with g++ and clang++-19, -Werror
#   4. consumer projects: find_package after install, add_subdirectory, FetchContent, pkg-config
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="$(nproc 2>/dev/null || echo 2)"
step() { printf '\n===== %s\n' "$*"; }

step "dependencies"
bash scripts/install-deps.sh

step "Release build (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "${jobs}"

step "no target links libcuda (the driver) directly"
if grep -rlE --include=link.txt '(^| )(-lcuda|[^ ]*/libcuda\.so[.0-9]*)( |$)' build; then
  echo "the files above link libcuda directly; link CUDA::cudart only" >&2
  exit 1
fi

step "unit tests and examples (Release)"
ctest --test-dir build --output-on-failure -j "${jobs}" -L 'unit|example'

step "ASan + UBSan build (build-asan/)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKVORTEX_SANITIZE=ON \
  -DKVORTEX_BUILD_TESTS=ON -DKVORTEX_BUILD_EXAMPLES=OFF -DKVORTEX_BUILD_BENCHMARKS=OFF
cmake --build build-asan -j "${jobs}"

step "unit tests (ASan + UBSan)"
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}" \
UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
  ctest --test-dir build-asan --output-on-failure -j "${jobs}" -L unit

step "header self-containment (g++, clang++-19)"
bash scripts/check-headers.sh g++ clang++-19

step "consumer projects"
bash scripts/test-consumers.sh

step "all checks passed"
