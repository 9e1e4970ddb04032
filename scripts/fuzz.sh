#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz-*.cpp) with clang-19, ASan and UBSan, replays the
# committed seeds and regression inputs, then fuzzes each target for FUZZ_SECONDS from a copy of
# its seeds (the committed corpus is never written). Fails on any crash, leak, hang or broken
# check; the input that did it is kept under <build>/tests/fuzz/work/<name>/artifacts/.
#
#   scripts/fuzz.sh                 every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh engine layout
#                                   the named targets only, 10 minutes each
#
# Environment: FUZZ_SECONDS (default 60), FUZZ_JOBS (targets run at once and build jobs,
# default 2), FUZZ_BUILD_DIR (default build-fuzz). Installs the Debian 12 packages it needs when
# they are missing, as scripts/install-deps.sh does.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${FUZZ_BUILD_DIR:-${root}/build-fuzz}"
seconds="${FUZZ_SECONDS:-60}"
jobs="${FUZZ_JOBS:-2}"

packages=(cmake libssl-dev clang-19 libfuzzer-19-dev libclang-rt-19-dev)
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${pkg}")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "fuzz: installing ${missing[*]}"
  sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "fuzz: run as root or install sudo" >&2; exit 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The fuzzers use the host engine only: leave CUDA out, which also keeps the build short.
CXX=clang++-19 cmake -S "${root}" -B "${build}" \
  -DKVORTEX_BUILD_FUZZERS=ON -DKVORTEX_BUILD_TESTS=OFF -DKVORTEX_BUILD_EXAMPLES=OFF \
  -DKVORTEX_BUILD_BENCHMARKS=OFF -DKVORTEX_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DKVORTEX_FUZZ_SECONDS="${seconds}" >/dev/null

targets=()
regex=""
for name in "$@"; do
  targets+=("kvortex-fuzz-${name}")
  regex+="${regex:+|}^fuzz: ${name}( \\(replay\\))?\$"
done
if [[ ${#targets[@]} -eq 0 ]]; then
  cmake --build "${build}" -j "${jobs}"
else
  cmake --build "${build}" -j "${jobs}" --target "${targets[@]}"
fi

filter=()
[[ -n "${regex}" ]] && filter=(-R "${regex}")
KVORTEX_FUZZ_SECONDS="${seconds}" ctest --test-dir "${build}" -L fuzz -j "${jobs}" --output-on-failure "${filter[@]}"
