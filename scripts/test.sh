#!/usr/bin/env bash
# The full check, as CI runs it:
#   1. Release build in build/: unit, stress, disk and redis tests, the examples and the Python
#      package's tests (ctest; Debian's /usr/bin/python3 with python3-pybind11, -numpy, -pytest)
#   2. ASan + UBSan Debug build in build-asan/: unit, disk and stress tests with LeakSanitizer on,
#      then every example under LeakSanitizer (scripts/leak-check.sh)
#   3. ThreadSanitizer build in build-tsan/: unit and stress tests (scripts/tsan.sh)
#   4. libFuzzer targets in build-fuzz/: replay of seeds and regressions, then a bounded run of
#      each target (scripts/fuzz.sh, FUZZ_SECONDS each, default 40 here)
#   5. every public header compiled alone with g++ and clang++-19, -Werror
#   6. consumer projects: find_package after install, add_subdirectory, FetchContent, pkg-config
# KVORTEX_STRESS_SECONDS (default 8 in the Release run, 3 under the sanitizers) bounds each
# stress case.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="$(nproc 2>/dev/null || echo 2)"
step() { printf '\n===== %s\n' "$*"; }

step "dependencies"
bash scripts/install-deps.sh

step "Release build (build/)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVORTEX_BUILD_PYTHON=ON -DPython3_EXECUTABLE=/usr/bin/python3
cmake --build build -j "${jobs}"

step "no target links libcuda (the driver) directly"
if grep -rlE --include=link.txt '(^| )(-lcuda|[^ ]*/libcuda\.so[.0-9]*)( |$)' build; then
  echo "the files above link libcuda directly; link CUDA::cudart only" >&2
  exit 1
fi

step "unit, stress and disk tests and examples (Release)"
KVORTEX_STRESS_SECONDS="${KVORTEX_STRESS_SECONDS:-8}" \
  ctest --test-dir build --output-on-failure -j "${jobs}" -L 'unit|example|stress|disk'

# On their own: they time Redis calls against deadlines, which busy stress threads would blur.
step "redis tests (Release; real redis-server processes on loopback)"
ctest --test-dir build --output-on-failure -j "${jobs}" -L redis

step "Python package tests (Release; pytest with NumPy)"
ctest --test-dir build --output-on-failure -L python

step "ASan + UBSan build (build-asan/)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKVORTEX_SANITIZE=ON \
  -DKVORTEX_BUILD_TESTS=ON -DKVORTEX_BUILD_EXAMPLES=ON -DKVORTEX_BUILD_BENCHMARKS=OFF
cmake --build build-asan -j "${jobs}"

step "unit, disk and stress tests (ASan + UBSan + LeakSanitizer)"
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}" \
UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
KVORTEX_STRESS_SECONDS="${KVORTEX_STRESS_SECONDS:-3}" \
  ctest --test-dir build-asan --output-on-failure -j "${jobs}" -L 'unit|disk|stress'

step "examples under LeakSanitizer"
LEAK_CHECK_BUILD_DIR=build-asan JOBS="${jobs}" bash scripts/leak-check.sh --examples-only

step "ThreadSanitizer: unit and stress tests (build-tsan/)"
JOBS="${jobs}" bash scripts/tsan.sh

step "fuzz targets (build-fuzz/)"
FUZZ_SECONDS="${FUZZ_SECONDS:-40}" FUZZ_JOBS="${jobs}" bash scripts/fuzz.sh

step "header self-containment (g++, clang++-19)"
bash scripts/check-headers.sh g++ clang++-19

step "consumer projects"
bash scripts/test-consumers.sh

step "all checks passed"
