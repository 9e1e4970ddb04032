#!/usr/bin/env bash
# Builds and runs the GPU tests, the gpu_offload example and the GPU benchmarks with plain g++
# lines (no CMake needed), writing logs and JSON under $OUT (default ./gpu-out).
#   scripts/gpu-run.sh [tests|bench|all] [benchmark filter]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
filter=${2:-.}
OUT=${OUT:-$PWD/gpu-out}
B=${B:-/tmp/kvortex-gpu-build}
CUDA=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$OUT" "$B"
export KVORTEX_CACHE_DIR=$B/cubin-cache

flags=(-std=c++23 -O2 -Wall -Wextra -Wpedantic -Werror -DKVORTEX_WITH_CUDA=1 -DKVORTEX_WITH_NVRTC=1
       -Iinclude -Itests -I"$CUDA/include")
libs=(-L"$CUDA/lib64" -lcudart -lnvrtc -lcrypto -lpthread)
if [ -e /usr/include/numa.h ]; then flags+=(-DKVORTEX_WITH_NUMA=1); libs+=(-lnuma); fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv || true
  g++ --version | head -1; nproc; free -g | head -2; cat /sys/kernel/mm/transparent_hugepage/enabled || true; } 2>&1 | tee "$OUT/machine.txt"

pids=()
if [ "$what" != bench ]; then
  ( g++ "${flags[@]}" -c tests/main.cpp -o "$B/main.o" &&
    g++ "${flags[@]}" -c tests/gpu-transfer.cpp -o "$B/gpu-transfer.o" &&
    g++ "${flags[@]}" -c tests/unit-nvrtc.cpp -o "$B/unit-nvrtc.o" &&
    g++ "$B/main.o" "$B/gpu-transfer.o" "$B/unit-nvrtc.o" -o "$B/kvortex-gpu-tests" "${libs[@]}" ) > "$OUT/build-tests.log" 2>&1 &
  pids+=($!)
  g++ "${flags[@]}" examples/gpu_offload.cpp -o "$B/gpu_offload" "${libs[@]}" > "$OUT/build-example.log" 2>&1 &
  pids+=($!)
fi
if [ "$what" != tests ]; then
  g++ "${flags[@]}" benchmarks/gpu-bench-transfer.cpp -o "$B/kvortex-gpu-bench" "${libs[@]}" -lcublas \
      -lbenchmark_main -lbenchmark > "$OUT/build-bench.log" 2>&1 &
  pids+=($!)
fi
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ $fail = 0 ] || { echo "BUILD FAILED"; tail -n 40 "$OUT"/build-*.log; }
cat "$OUT"/build-*.log > "$OUT/build.log" 2>/dev/null; rm -f "$OUT"/build-*.log

rc=0
if [ "$what" != bench ] && [ -x "$B/kvortex-gpu-tests" ]; then
  echo "== tests"; timeout 240 "$B/kvortex-gpu-tests" -s 2>&1 | tail -n 400 > "$OUT/tests.log"; rc=${PIPESTATUS[0]}
  grep -E "MESSAGE|test cases|assertions|Status|ERROR|FAILED" "$OUT/tests.log" | tail -n 30
  echo "== example"; timeout 60 "$B/gpu_offload" 2>&1 | tee "$OUT/example.log"
fi
if [ "$what" != tests ] && [ -x "$B/kvortex-gpu-bench" ]; then
  echo "== benchmarks ($filter)"
  timeout ${BENCH_TIMEOUT:-400} "$B/kvortex-gpu-bench" --benchmark_filter="$filter" --benchmark_format=console \
    --benchmark_out="$OUT/gpu-bench.json" --benchmark_out_format=json --benchmark_counters_tabular=true \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  python3 scripts/gpu-table.py "$OUT/gpu-bench.json" --png "$OUT/gpu-bench.png" 2>&1 | tee "$OUT/table.md" | tail -n 80
fi
exit $rc
