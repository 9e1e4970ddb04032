#!/usr/bin/env bash
# The unit and stress suites under ThreadSanitizer, as CI runs them:
#   1. configure build-tsan/ (RelWithDebInfo, KVORTEX_SANITIZE_THREAD=ON, no examples or benchmarks)
#   2. build kvortex-tests and kvortex-stress-tests
#   3. ctest -L 'unit|stress', stopping at the first report (halt_on_error=1)
# Environment: CXX (default clang++-19 when installed, else g++), KVORTEX_STRESS_SECONDS (seconds
# per stress case, default 3), JOBS (default nproc), KVORTEX_TSAN_BUILD_DIR (default build-tsan),
# TSAN_OPTIONS (appended to the defaults).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${CXX:-}" ]]; then
  if command -v clang++-19 >/dev/null; then CXX=clang++-19; else CXX=g++; fi
fi
cxx="$(command -v "${CXX}")"
build="${KVORTEX_TSAN_BUILD_DIR:-build-tsan}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
step() { printf '\n===== %s\n' "$*"; }
elapsed() { printf '(%d s)\n' "$((SECONDS - $1))"; }

# A cache made with another compiler cannot be reconfigured in place.
if [[ -f "${build}/CMakeCache.txt" ]] &&
   ! grep -qx "CMAKE_CXX_COMPILER:[A-Z]*=${cxx}" "${build}/CMakeCache.txt"; then
  rm -rf "${build}/CMakeCache.txt" "${build}/CMakeFiles"
fi

step "configure ${build}/ with ${cxx}"
t0=${SECONDS}
cmake -S . -B "${build}" -DCMAKE_CXX_COMPILER="${cxx}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVORTEX_SANITIZE_THREAD=ON -DKVORTEX_BUILD_TESTS=ON -DKVORTEX_BUILD_EXAMPLES=OFF \
  -DKVORTEX_BUILD_BENCHMARKS=OFF
elapsed "${t0}"

step "build the unit and stress tests"
t0=${SECONDS}
cmake --build "${build}" -j "${jobs}" --target kvortex-tests kvortex-stress-tests
elapsed "${t0}"

step "unit and stress tests under ThreadSanitizer"
t0=${SECONDS}
# Named explicitly: the runtime does not always find it on PATH, and reports without file:line
# are of little use.
symbolizer=""
if sym="$(command -v llvm-symbolizer)"; then symbolizer=":external_symbolizer_path=${sym}"; fi
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1${symbolizer}${TSAN_OPTIONS:+:${TSAN_OPTIONS}}"
export KVORTEX_STRESS_SECONDS="${KVORTEX_STRESS_SECONDS:-3}"
ctest --test-dir "${build}" --output-on-failure -j "${jobs}" --timeout 600 -L 'unit|stress'
elapsed "${t0}"

step "ThreadSanitizer found nothing"
