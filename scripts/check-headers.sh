#!/usr/bin/env bash
# Compiles every public header alone (a translation unit that includes just that header) with each
# given compiler, -std=c++23 -Wall -Wextra -Wpedantic -Werror -fsyntax-only, twice: with no
# optional feature and with every optional feature available on this machine (NUMA, xxHash, CUDA).
# Usage: scripts/check-headers.sh [compiler...]   (default: g++ and clang++-19 when installed)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
compilers=("$@")
if [[ ${#compilers[@]} -eq 0 ]]; then
  compilers=(g++)
  if command -v clang++-19 >/dev/null; then compilers+=(clang++-19); fi
fi

mapfile -t headers < <(cd "${root}/include" && find . -name '*.hpp' -printf '%P\n' | LC_ALL=C sort)
if [[ ${#headers[@]} -eq 0 ]]; then
  echo "no headers under include/" >&2
  exit 1
fi

# Headers that need the CUDA toolkit (they include its headers, or such a header) are checked only
# with the feature set, and only where the toolkit is installed.
declare -A cuda_only=()
for h in "${headers[@]}"; do
  grep -qE '^#include <(cuda|nvrtc)' "${root}/include/${h}" && cuda_only["${h}"]=1
done
changed=1
while [[ ${changed} -eq 1 ]]; do
  changed=0
  for h in "${headers[@]}"; do
    [[ -n "${cuda_only[${h}]:-}" ]] && continue
    for dep in "${!cuda_only[@]}"; do
      if grep -qF "#include \"${dep}\"" "${root}/include/${h}"; then
        cuda_only["${h}"]=1
        changed=1
        break
      fi
    done
  done
done

features=()
[[ -f /usr/include/numa.h ]] && features+=(-DKVORTEX_WITH_NUMA=1)
[[ -f /usr/include/xxhash.h ]] && features+=(-DKVORTEX_WITH_XXHASH=1)
[[ -f /usr/include/liburing.h ]] && features+=(-DKVORTEX_WITH_LIBURING=1)
[[ -f /usr/include/hiredis/hiredis.h ]] && features+=(-DKVORTEX_WITH_HIREDIS=1)
cuda_root="${CUDAToolkit_ROOT:-/usr/local/cuda}"
have_cuda=0
if [[ -f "${cuda_root}/include/cuda_runtime_api.h" ]]; then
  have_cuda=1
  features+=(-DKVORTEX_WITH_CUDA=1 -isystem "${cuda_root}/include")
  [[ -f "${cuda_root}/include/nvrtc.h" ]] && features+=(-DKVORTEX_WITH_NVRTC=1)
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/kvortex-headers.XXXXXX")"
trap 'rm -rf "${work}"' EXIT

# One job line per (compiler, feature set, header); run them on every core.
jobs_file="${work}/jobs"
: >"${jobs_file}"
for cxx in "${compilers[@]}"; do
  command -v "${cxx}" >/dev/null || { echo "compiler not found: ${cxx}" >&2; exit 1; }
  for set in plain features; do
    for h in "${headers[@]}"; do
      if [[ -n "${cuda_only[${h}]:-}" ]] && [[ "${set}" == plain || ${have_cuda} -eq 0 ]]; then continue; fi
      printf '%s\t%s\t%s\n' "${cxx}" "${set}" "${h}" >>"${jobs_file}"
    done
  done
done

export root work
export KVORTEX_FEATURES="${features[*]}"
check_one() {
  local cxx="$1" set="$2" h="$3"
  local tu
  tu="${work}/$(echo "${cxx}-${set}-${h}" | tr '/+' '__').cpp"
  printf '#include <%s>\n' "${h}" >"${tu}"
  local flags=()
  # shellcheck disable=SC2206 # the feature flags are split on purpose
  [[ "${set}" == features ]] && flags=(${KVORTEX_FEATURES})
  if ! "${cxx}" -std=c++23 -Wall -Wextra -Wpedantic -Werror -fsyntax-only \
       -I"${root}/include" "${flags[@]}" "${tu}" 2>"${tu}.log"; then
    echo "FAIL ${cxx} [${set}] ${h}"
    cat "${tu}.log"
    return 1
  fi
  echo "ok   ${cxx} [${set}] ${h}"
}
export -f check_one

status=0
tr '\t' '\n' <"${jobs_file}" | xargs -d '\n' -n 3 -P "$(nproc 2>/dev/null || echo 2)" \
  bash -c 'check_one "$@"' _ || status=1
if [[ ${status} -ne 0 ]]; then
  echo "header check FAILED" >&2
  exit 1
fi
echo "header check passed: ${#headers[@]} headers (${#cuda_only[@]} need CUDA: feature set only) x ${#compilers[@]} compilers x 2 feature sets"
