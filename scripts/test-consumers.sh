#!/usr/bin/env bash
# Builds and runs the consumer projects under tests/cmake_* against this source tree:
#   1. configure + install KVortex to a temporary prefix, then find_package(kvortex) (cmake_import)
#   2. add_subdirectory of the source tree (cmake_add_subdirectory)
#   3. FetchContent with SOURCE_DIR (cmake_fetchcontent)
#   4. pkg-config --cflags --libs kvortex against the same install
# Environment: CXX (compiler), KVORTEX_CONSUMER_WORKDIR (kept, instead of a removed temp dir),
#              KVORTEX_CMAKE_ARGS (extra arguments for every configure step).
set -euo pipefail

src="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${KVORTEX_CONSUMER_WORKDIR:-}" ]]; then
  work="${KVORTEX_CONSUMER_WORKDIR}"
  rm -rf "${work}"
  mkdir -p "${work}"
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/kvortex-consumers.XXXXXX")"
  trap 'rm -rf "${work}"' EXIT
fi
prefix="${work}/prefix"
jobs="$(nproc 2>/dev/null || echo 2)"
read -r -a extra <<<"${KVORTEX_CMAKE_ARGS:-}"
common=(-DCMAKE_BUILD_TYPE=Release "${extra[@]}")

step() { printf '\n=== %s\n' "$*"; }

step "install kvortex to ${prefix}"
cmake -S "${src}" -B "${work}/kvortex-build" "${common[@]}" \
  -DCMAKE_INSTALL_PREFIX="${prefix}" \
  -DKVORTEX_BUILD_TESTS=OFF -DKVORTEX_BUILD_BENCHMARKS=OFF -DKVORTEX_BUILD_EXAMPLES=OFF
cmake --build "${work}/kvortex-build"
cmake --install "${work}/kvortex-build"

run_consumer() {
  local name="$1"
  shift
  step "consumer ${name}"
  cmake -S "${src}/tests/${name}" -B "${work}/${name}" "${common[@]}" "$@"
  cmake --build "${work}/${name}" -j "${jobs}"
  "${work}/${name}/consumer"
}

run_consumer cmake_import -DCMAKE_PREFIX_PATH="${prefix}"
run_consumer cmake_add_subdirectory -DKVORTEX_SOURCE_DIR="${src}"
run_consumer cmake_fetchcontent -DKVORTEX_SOURCE_DIR="${src}"

step "consumer pkg-config"
pc="$(find "${prefix}" -name kvortex.pc -print -quit)"
if [[ -z "${pc}" ]]; then
  echo "kvortex.pc was not installed" >&2
  exit 1
fi
cflags="$(PKG_CONFIG_PATH="$(dirname "${pc}")" pkg-config --cflags kvortex)"
libs="$(PKG_CONFIG_PATH="$(dirname "${pc}")" pkg-config --libs kvortex)"
echo "cflags: ${cflags}"
echo "libs:   ${libs}"
# shellcheck disable=SC2086 # word splitting of the pkg-config flags is intended
"${CXX:-c++}" -O2 ${cflags} "${src}/tests/consumer_main.cpp" -o "${work}/pkgconfig-consumer" ${libs}
libpath="${LD_LIBRARY_PATH:-}"
for flag in ${libs}; do
  if [[ "${flag}" == -L* ]]; then libpath="${flag#-L}${libpath:+:${libpath}}"; fi
done
LD_LIBRARY_PATH="${libpath}" "${work}/pkgconfig-consumer"

step "all consumer builds passed"
