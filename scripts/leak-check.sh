#!/usr/bin/env bash
# Leak check: every example (with the arguments the README uses) and the unit suite under
# LeakSanitizer, zero leaks allowed. ASan + UBSan build in build-lsan/ (KVORTEX_SANITIZE=ON).
#
# LeakSanitizer stops the process to scan it and cannot run under ptrace (strace, gdb, some
# containers). A leaking probe checks that it works here; if it does not, the same programs run
# under valgrind --leak-check=full from an unsanitized build (build-lsan-valgrind/, or
# LEAK_CHECK_BUILD_DIR) instead.
#
# Usage: scripts/leak-check.sh [--valgrind] [--examples-only]
#   --valgrind       skip LSan, use valgrind
#   --examples-only  leave the unit suite out (scripts/test.sh already runs it under ASan with
#                    detect_leaks=1); with LEAK_CHECK_BUILD_DIR=build-asan only the examples build
# Environment: JOBS (build and ctest parallelism, default 2); CXX (compiler for the build and the
# probe); LEAK_CHECK_BUILD_DIR (default build-lsan): point it at an existing KVORTEX_SANITIZE=ON
# tree, e.g. the build-asan/ of scripts/test.sh, to reuse its objects (its build type is kept);
# ASAN_OPTIONS (detect_leaks=1 is appended).
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${JOBS:-2}"
build="${LEAK_CHECK_BUILD_DIR:-build-lsan}"
step() { printf '\n===== leak-check: %s\n' "$*"; }
die() { printf 'leak-check: %s\n' "$*" >&2; exit 1; }

# Each example and its arguments, as in the README and examples/CMakeLists.txt.
leak_disk="${TMPDIR:-/tmp}/kvortex-leak-check-disk.$$"
examples=(quickstart custom_policy "kvortex-demo --quick" "kvortex-demo --quick --disk ${leak_disk}"
          "kvortex-demo --quick --disk ${leak_disk} --require-tier-hits" gpu_offload)
trap 'rm -rf "${leak_disk}"' EXIT

mode=lsan
unit=yes
for arg in "$@"; do
  case "${arg}" in
    --valgrind) mode=valgrind ;;
    --examples-only) unit=no ;;
    *) die "unknown option ${arg} (see the header of $0)" ;;
  esac
done

# --- does LeakSanitizer work here? ------------------------------------------------------------
if [[ "${mode}" == lsan ]]; then
  step "probe: is a deliberate leak reported?"
  probe_dir="$(mktemp -d)"
  trap 'rm -rf "${probe_dir}" "${leak_disk}"' EXIT
  cat >"${probe_dir}/probe.cpp" <<'EOF'
#include <cstdlib>
void* volatile sink;
int main() {
  sink = std::malloc(4096);
  sink = nullptr;  // the only pointer is gone: a definite leak
  return 0;
}
EOF
  "${CXX:-c++}" -g -fsanitize=address -fno-omit-frame-pointer "${probe_dir}/probe.cpp" -o "${probe_dir}/probe"
  set +e
  ASAN_OPTIONS=detect_leaks=1 "${probe_dir}/probe" >"${probe_dir}/probe.log" 2>&1
  probe_rc=$?
  set -e
  if [[ ${probe_rc} -ne 0 ]] && grep -q "LeakSanitizer: detected memory leaks" "${probe_dir}/probe.log"; then
    echo "LeakSanitizer works here (the probe's 4096-byte leak was reported, exit ${probe_rc})"
  else
    echo "LeakSanitizer does not work here (probe exit ${probe_rc}):"
    sed -n 1,5p "${probe_dir}/probe.log"
    command -v valgrind >/dev/null || die "no valgrind to fall back to (Debian: apt-get install valgrind)"
    echo "falling back to valgrind"
    mode=valgrind
  fi
fi

sanitize=ON
if [[ "${mode}" == valgrind ]]; then
  [[ -n "${LEAK_CHECK_BUILD_DIR:-}" ]] || build=build-lsan-valgrind  # valgrind cannot run ASan binaries
  sanitize=OFF
fi

# --- build ------------------------------------------------------------------------------------
step "configure ${build}/ (sanitize=${sanitize})"
configure=(-DKVORTEX_SANITIZE="${sanitize}" -DKVORTEX_BUILD_EXAMPLES=ON -DKVORTEX_BUILD_TESTS=ON
  -DKVORTEX_BUILD_BENCHMARKS=OFF)
# A fresh tree gets optimised code with debug info (readable leak stacks); an existing one keeps
# its build type, so its objects are reused.
[[ -f "${build}/CMakeCache.txt" ]] || configure+=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
cmake -S . -B "${build}" "${configure[@]}" >/dev/null

# Target names, from Makefile ("... name") or Ninja ("name: phony") help output.
available="$(cmake --build "${build}" --target help | sed -n -e 's/^\.\.\. \([^ ]*\).*/\1/p' -e 's/^\([^ :]*\): .*/\1/p')"
has_target() { grep -qx "$1" <<<"${available}"; }

targets=()
[[ "${unit}" == yes ]] && targets+=(kvortex-tests)
for ex in "${examples[@]}"; do
  name="${ex%% *}"
  if has_target "${name}"; then targets+=("${name}"); else echo "no target ${name} in this configuration: skipped"; fi
done
step "build ${targets[*]}"
cmake --build "${build}" -j "${jobs}" --target "${targets[@]}"

if [[ "${mode}" == lsan ]]; then
  # Examples go through kvortex_target_options, which adds the sanitizer flags: make sure, from
  # the compile commands of every object of every target built.
  "${PYTHON:-python3}" - "${build}/compile_commands.json" "${targets[@]}" <<'EOF'
import json, sys
commands, targets = json.load(open(sys.argv[1])), sys.argv[2:]
for t in targets:
    objs = [c for c in commands if f"CMakeFiles/{t}.dir/" in c.get("output", c.get("command", ""))]
    if not objs:
        sys.exit(f"leak-check: no compile command found for {t}")
    bare = [c["file"] for c in objs if "-fsanitize=address" not in c.get("command", " ".join(c.get("arguments", [])))]
    if bare:
        sys.exit(f"leak-check: {t} compiles without -fsanitize=address: {', '.join(bare)}")
    print(f"{t}: {len(objs)} objects, all with -fsanitize=address")
EOF
fi

# --- run --------------------------------------------------------------------------------------
export ASAN_OPTIONS="${ASAN_OPTIONS:+${ASAN_OPTIONS}:}detect_leaks=1"
export LSAN_OPTIONS="${LSAN_OPTIONS:-report_objects=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
valgrind_cmd=(valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect,possible
  --errors-for-leak-kinds=definite,indirect,possible --error-exitcode=1)

failed=()
run() {  # run <label> <command...>
  local label="$1"
  shift
  local t0=${SECONDS}
  echo "--- ${label}: $*"
  local rc=0
  if [[ "${mode}" == valgrind ]]; then
    "${valgrind_cmd[@]}" "$@" || rc=$?
  else
    "$@" || rc=$?
  fi
  if [[ ${rc} -ne 0 ]]; then
    failed+=("${label}")
    echo "*** ${label}: FAILED (exit ${rc}, ${mode})"
    return 0
  fi
  echo "--- ${label}: no leaks ($((SECONDS - t0)) s)"
}

step "examples (${mode})"
for ex in "${examples[@]}"; do
  read -r -a argv <<<"${ex}"
  has_target "${argv[0]}" || continue
  run "example ${argv[0]}" "${build}/examples/${argv[0]}" "${argv[@]:1}"
done

if [[ "${unit}" == no ]]; then
  echo "unit suite left out (--examples-only)"
elif [[ "${mode}" == valgrind ]]; then
  step "unit suite (${mode})"
  run "unit suite" "${build}/tests/kvortex-tests"
else
  step "unit suite (${mode})"
  # One process per test case, so a leak names its test; LeakSanitizer checks each one at exit.
  ctest --test-dir "${build}" -L '^unit$' -j "${jobs}" --output-on-failure || failed+=("unit suite")
fi

if [[ ${#failed[@]} -ne 0 ]]; then
  printf '\nleak-check: FAILED: %s\n' "${failed[*]}" >&2
  exit 1
fi
printf '\nleak-check: zero leaks (%s): %s%s\n' "${mode}" "${examples[*]}" "$([[ "${unit}" == yes ]] && echo ", unit suite")"
