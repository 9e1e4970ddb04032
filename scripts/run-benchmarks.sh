#!/usr/bin/env bash
# Builds kvortex-bench (Release), runs it, times the Python hashing baseline in the same run, and
# prints the performance targets as a Markdown table with PASS/FAIL.
#
#   scripts/run-benchmarks.sh [--build-dir DIR] [--filter REGEX] [--repetitions N] [--no-build]
#                             [-- extra kvortex-bench flags]
#
# Benchmarks whose names start with mt/ use several threads and run unpinned; all others run
# pinned to one core (taskset -c 0, where taskset exists). Their single-thread rates come from CPU
# time, so other processes on a shared machine do not stretch them. Results go to
# <build dir>/results/: bench-1core.json, bench-mt.json, python-hash*.json, summary.md.
# Environment: CXX, CMAKE (default cmake), PYTHON (default python3), BENCH_CXXFLAGS (extra
# compiler flags, e.g. -march=native; the default is the compiler's portable target).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build="$root/build-bench"
filter=""
reps=3
do_build=1
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) build=$(realpath -m "$2"); shift 2 ;;
    --filter) filter="$2"; shift 2 ;;
    --repetitions) reps="$2"; shift 2 ;;
    --no-build) do_build=0; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run-benchmarks.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cmake_bin=${CMAKE:-cmake}
python=${PYTHON:-python3}
results="$build/results"
bench="$build/benchmarks/kvortex-bench"
mkdir -p "$results"

# ---- build ----------------------------------------------------------------------------------
manual_build() {
  echo "run-benchmarks.sh: no kvortex-bench CMake target, compiling by hand" >&2
  mkdir -p "$build/benchmarks"
  local defs=()
  [[ -f /usr/include/xxhash.h ]] && defs+=(-DKVORTEX_WITH_XXHASH=1)
  local libs=(-lbenchmark_main -lbenchmark -lcrypto -lpthread)
  if [[ -f /usr/include/numa.h ]]; then defs+=(-DKVORTEX_WITH_NUMA=1); libs+=(-lnuma); fi
  # shellcheck disable=SC2086
  "${CXX:-g++}" -std=c++23 -O2 -DNDEBUG -Wall -Wextra -Wpedantic -Werror ${BENCH_CXXFLAGS:-} "${defs[@]}" \
    -I"$root/include" -I"$root/benchmarks" "$root"/benchmarks/bench-*.cpp -o "$bench" "${libs[@]}"
}

# The target list is read whole before it is searched: `... --target help | grep -q` fails under
# pipefail, since grep exits at the first match and cmake, still writing, dies of SIGPIPE.
has_bench_target() {
  local targets
  targets="$("$cmake_bin" --build "$build" --target help 2>/dev/null)" || return 1
  [[ "$targets" == *kvortex-bench* ]]
}

if [[ $do_build -eq 1 ]]; then
  if "$cmake_bin" -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DKVORTEX_BUILD_BENCHMARKS=ON \
       -DKVORTEX_BUILD_TESTS=OFF -DKVORTEX_BUILD_EXAMPLES=OFF \
       -DCMAKE_CXX_FLAGS="${BENCH_CXXFLAGS:-}" >"$results/configure.log" 2>&1 &&
     has_bench_target; then
    "$cmake_bin" --build "$build" --target kvortex-bench -j "$(nproc)"
  else
    manual_build
  fi
fi
[[ -x "$bench" ]] || { echo "run-benchmarks.sh: $bench is missing" >&2; exit 1; }

# ---- run ------------------------------------------------------------------------------------
pin=()
if command -v taskset >/dev/null && taskset -c 0 true 2>/dev/null; then pin=(taskset -c 0); fi

# Names selected by the user's filter, split into the pinned group and the mt/ group; each group
# runs with an exact-name regex (the library's POSIX regex has no lookahead to AND two filters).
mapfile -t names < <("$bench" --benchmark_list_tests ${filter:+--benchmark_filter="$filter"})
exact_regex() {
  local out="" n
  for n in "$@"; do
    n=$(printf '%s' "$n" | sed 's/[][\.^$*+?(){}|]/\\&/g')
    out+="${out:+|}$n"
  done
  printf '^(%s)$' "$out"
}
one=() mt=()
for n in "${names[@]}"; do
  [[ -z "$n" ]] && continue
  if [[ "$n" == mt/* ]]; then mt+=("$n"); else one+=("$n"); fi
done

common=(--benchmark_format=json --benchmark_repetitions="$reps" --benchmark_report_aggregates_only=true)
rm -f "$results/bench-1core.json" "$results/bench-mt.json"
if [[ ${#one[@]} -gt 0 ]]; then
  echo "== one-core group (${#one[@]} benchmarks${pin:+, ${pin[*]}})" >&2
  "${pin[@]}" "$bench" "${common[@]}" --benchmark_filter="$(exact_regex "${one[@]}")" \
    --benchmark_out="$results/bench-1core.json" --benchmark_out_format=json "${extra[@]}" >/dev/null
fi
if [[ ${#mt[@]} -gt 0 ]]; then
  echo "== multi-thread group (${#mt[@]} benchmarks, unpinned)" >&2
  "$bench" "${common[@]}" --benchmark_filter="$(exact_regex "${mt[@]}")" \
    --benchmark_out="$results/bench-mt.json" --benchmark_out_format=json "${extra[@]}" >/dev/null
fi

# The Python baseline, pinned like the kvortex side, with each interpreter present.
py_files=()
run_python() {
  local py=$1 out=$2
  command -v "$py" >/dev/null || return 0
  "${pin[@]}" "$py" "$root/scripts/compare_python_hash.py" >"$out"
  py_files+=("$out")
}
run_python "$python" "$results/python-hash.json"
if [[ -x /usr/bin/python3 && "$(command -v "$python")" != /usr/bin/python3 ]]; then
  run_python /usr/bin/python3 "$results/python-hash-usr-bin.json"
fi

# ---- report ---------------------------------------------------------------------------------
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n1)
"$python" - "$results" "${cpu:-unknown CPU}" "$(nproc)" "${pin[*]:-unpinned}" "${py_files[@]}" <<'PY' | tee "$results/summary.md"
import json, os, sys

results, cpu, ncpu, pin, py_files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
runs = {}
for f in ("bench-1core.json", "bench-mt.json"):
    p = os.path.join(results, f)
    if not os.path.exists(p):
        continue
    with open(p) as fh:
        doc = json.load(fh)
    for b in doc.get("benchmarks", []):
        # Median of the repetitions; a plain entry when run without repetitions.
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        runs[b.get("run_name", b["name"])] = b

scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
def us(name, key="cpu_time"):
    b = runs.get(name)
    return None if b is None else b[key] * scale[b.get("time_unit", "ns")]
def gbs(name):
    b = runs.get(name)
    return None if b is None or "bytes_per_second" not in b else b["bytes_per_second"] / 1e9

pys = []
for f in py_files:
    with open(f) as fh:
        pys.append(json.load(fh))
py = min(pys, key=lambda d: d["python_chained_sha256_8192_us"]) if pys else None

rows = []
def row(target, measured, goal, ok, note=""):
    status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    rows.append(f"| {target} | {measured} | {goal} | {status} | {note} |")
def fmt(v, unit, digits=2):
    return "not run" if v is None else f"{v:.{digits}f} {unit}"

sha = us("lookup/sha256/hit/tokens:8192")
sha_wall = us("lookup/sha256/hit/tokens:8192", "real_time")
row("lookup, 8192 tokens, SHA-256, full hit (CPU time, 1 core)", fmt(sha, "us"), "<= 25 us",
    None if sha is None else sha <= 25, "" if sha_wall is None else f"wall {sha_wall:.2f} us; "
    f"hashing alone {fmt(us('lookup/sha256/chunk_keys_only/tokens:8192'), 'us')}")
if py and sha:
    r = py["python_chained_sha256_8192_us"] / sha
    row("Python chained sha256(pickle) / kvortex SHA-256 lookup", f"{r:.1f}x",
        ">= 5x", r >= 5, f"Python {py['python_chained_sha256_8192_us']:.1f} us ({py['python']} {py['python_version']}); "
        f"16-token blocks: Python {py['python_chained_sha256_8192_block16_us']:.1f} us vs kvortex hashing "
        f"{fmt(us('hash/sha256/prompt:8192/chunk_tokens:16'), 'us')}")
else:
    row("Python chained sha256(pickle) / kvortex SHA-256 lookup", "not run", ">= 5x", None)
xx = us("lookup/xxh3/hit/tokens:8192")
xx_wall = us("lookup/xxh3/hit/tokens:8192", "real_time")
row("lookup, 8192 tokens, XXH3-128, full hit (CPU time, 1 core)", fmt(xx, "us"), "<= 5 us",
    None if xx is None else xx <= 5, "" if xx_wall is None else f"wall {xx_wall:.2f} us; "
    f"hashing alone {fmt(us('lookup/xxh3/chunk_keys_only/tokens:8192'), 'us')}")

def ratio_row(label, engine, base):
    e, b = gbs(engine), gbs(base)
    if e is None or b is None:
        row(label, "not run", ">= 0.80", None)
        return
    row(label, f"{e / b:.2f} ({e:.2f} / {b:.2f} GB/s)", ">= 0.80", e / b >= 0.8)

ratio_row("store / memcpy, 64 x 1 MiB chunks, 1 thread", "transfer/host_engine/store/transfer_threads:1",
          "transfer/memcpy/store_pattern/reused/threads:1")
ratio_row("store / memcpy, 1 thread, numa_pool_allocator stack", "transfer/pool_engine/store/transfer_threads:1",
          "transfer/memcpy/store_pattern/reused/threads:1")
ratio_row("retrieve / memcpy, 64 x 1 MiB chunks, 1 thread", "transfer/host_engine/retrieve/transfer_threads:1",
          "transfer/memcpy/retrieve_pattern/reused/threads:1")
ratio_row("retrieve into flash_attn paged cache, random table / memcpy, 1 thread",
          "transfer/host_engine/retrieve_flash_attn_random_table/transfer_threads:1",
          "transfer/memcpy/retrieve_flash_attn_random_table")
ratio_row("store / memcpy, 2 threads (wall)", "mt/transfer/host_engine/store/transfer_threads:2/real_time",
          "mt/transfer/memcpy/store_pattern/reused/threads:2/real_time")
ratio_row("retrieve / memcpy, 2 threads (wall)", "mt/transfer/host_engine/retrieve/transfer_threads:2/real_time",
          "mt/transfer/memcpy/retrieve_pattern/reused/threads:2/real_time")

# Storage tiers: counters the tier benchmarks report themselves (same run, same directory or server).
def counter(name, key):
    b = runs.get(name)
    return None if b is None or key not in b else b[key]
def counter_row(label, name, key, goal, ok, note=""):
    v = counter(name, key)
    row(label, "not run" if v is None else f"{v:.2f}", goal, None if v is None else ok(v), note)
for io in ("1", "0"):
    engine = "io_uring" if io == "1" else "pread/pwrite"
    counter_row(f"disk tier write / raw sequential write, 4 MiB chunks, 1 thread, {engine}",
                f"disk/write/chunk:4MiB/threads:1/fsync:0/io_uring:{io}/manual_time", "ratio", ">= 0.80", lambda v: v >= 0.8)
    counter_row(f"disk tier read / raw sequential read, 4 MiB chunks, 1 thread, {engine}",
                f"disk/read/chunk:4MiB/threads:1/io_uring:{io}/manual_time", "ratio", ">= 0.80", lambda v: v >= 0.8)
for op in ("put", "get"):
    counter_row(f"redis tier {op} / pipelined hiredis, 1 MiB values, batches of 16",
                f"redis/{op}/chunk_KiB:1024/batch:16/min_time:1.000/manual_time", "ratio", ">= 0.80", lambda v: v >= 0.8)
counter_row("redis lookup (contains) of 32 keys / one PING, p50", "redis/contains/keys:32/iterations:3000/manual_time",
            "p50_ratio", "<= 2.0", lambda v: v <= 2.0)
rebuild = us("disk/index_rebuild/entries:100000/snapshot:0/verify:0/real_time", "real_time")
row("disk index rebuild, 100k entries, directory scan", fmt(None if rebuild is None else rebuild / 1e6, "s"), "<= 1 s",
    None if rebuild is None else rebuild <= 1e6)
for tier in ("disk", "redis"):
    name = f"tiered_retrieve/{tier}/tokens:8192/iterations:5/manual_time"
    counter_row(f"retrieve of 8192 tokens from {tier} / (tier reads + copies), pipelined", name, "ratio_to_sum",
                "< 1 (overlap)", lambda v: v < 1.0,
                "" if counter(name, "read_s") is None else
                f"reads {counter(name, 'read_s'):.3f} s, copies {counter(name, 'copy_s'):.3f} s")

print(f"kvortex benchmarks on {cpu} ({ncpu} CPUs); single-thread rows {pin}, median of the repetitions.\n")
print("| target | measured | goal | result | notes |")
print("|---|---|---|---|---|")
print("\n".join(rows))
print("\nOther results (median):\n")
print("| benchmark | time | CPU | rate |")
print("|---|---|---|---|")
for name, b in runs.items():
    u = b.get("time_unit", "ns")
    rate = ""
    if "bytes_per_second" in b:
        rate = f"{b['bytes_per_second'] / 1e9:.2f} GB/s"
    elif "items_per_second" in b:
        rate = f"{b['items_per_second'] / 1e6:.3f} M items/s"
    print(f"| {name} | {b['real_time']:.3f} {u} | {b['cpu_time']:.3f} {u} | {rate} |")
PY
echo "results: $results" >&2
