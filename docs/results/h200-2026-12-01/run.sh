#!/usr/bin/env bash
# On the GPU machine: builds the GPU tests (CMake, then `ctest -L gpu`), the same tests without
# NVRTC (every batch DMA-only), the transfer benchmark against the scheduler before this change
# (before/include) and after it, and the DMA probe's sweep; writes logs, JSON and tables to $OUT.
#   OUT=dir [SWEEP=0] [REPEAT=1] bash docs/results/h200-2026-12-01/run.sh [benchmark sizes regex, default 8|16|32|64]
set -uo pipefail
cd "$(dirname "$0")/../../.."
D=docs/results/h200-2026-12-01
sizes=${1:-8|16|32|64}
OUT=${OUT:-$PWD/gpu-out}
B=/tmp/kvortex-h200
CUDA=/usr/local/cuda
mkdir -p "$OUT" "$B"
export KVORTEX_CACHE_DIR=$B/cubin-cache
log=$OUT/logs.txt
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
  g++ --version | head -1; cmake --version | head -1; nproc; } 2>&1 | tee "$OUT/machine.txt"
flags=(-std=c++23 -O2 -Wall -Wextra -Wpedantic -Werror -DKVORTEX_WITH_CUDA=1)
inc=(-Iinclude -Itests -I$CUDA/include)
libs=(-L$CUDA/lib64 -lcudart -lcrypto -lpthread)
t0=$(date +%s)
( cmake -S . -B $B/cmake -DCMAKE_BUILD_TYPE=Release -DKVORTEX_BUILD_BENCHMARKS=OFF -DKVORTEX_BUILD_EXAMPLES=OFF &&
  cmake --build $B/cmake -j 8 --target kvortex-gpu-tests ) > $B/build-tests.log 2>&1 &
p1=$!
g++ "${flags[@]}" "${inc[@]}" -DKVORTEX_WITH_NVRTC=1 benchmarks/gpu-bench-transfer.cpp -o $B/bench-after "${libs[@]}" -lnvrtc -lcublas \
  -lbenchmark_main -lbenchmark > $B/build-after.log 2>&1 &
p2=$!
# The scheduler before this change (commit 7397153), first on the include path. Extract it here
# before copying the tree to the GPU machine:
#   mkdir -p docs/results/h200-2026-12-01/before/include/kvortex/schedulers && git show \
#     7397153:include/kvortex/schedulers/cuda_transfer_scheduler.hpp > $_/cuda_transfer_scheduler.hpp
[ -f $D/before/include/kvortex/schedulers/cuda_transfer_scheduler.hpp ] || echo "no before/ header: see run.sh"
g++ "${flags[@]}" -I$D/before/include "${inc[@]}" -DKVORTEX_WITH_NVRTC=1 benchmarks/gpu-bench-transfer.cpp -o $B/bench-before "${libs[@]}" \
  -lnvrtc -lcublas -lbenchmark_main -lbenchmark > $B/build-before.log 2>&1 &
p3=$!
# Without NVRTC: no kernels, so every GPU test runs the DMA-only path.
( g++ "${flags[@]}" "${inc[@]}" -c tests/main.cpp -o $B/main.o && g++ "${flags[@]}" "${inc[@]}" -c tests/gpu-transfer.cpp -o $B/gt.o &&
  g++ $B/main.o $B/gt.o -o $B/gpu-tests-no-nvrtc "${libs[@]}" ) > $B/build-no-nvrtc.log 2>&1 &
p4=$!
g++ -O2 -std=c++20 -I$CUDA/include $D/dma_probe.cpp -L$CUDA/lib64 -lcudart -lpthread -o $B/dma_probe > $B/build-probe.log 2>&1 &
p5=$!
for p in $p1 $p2 $p3 $p4 $p5; do wait $p || echo "a build failed (pid $p)"; done
cat $B/build-*.log > "$log"
grep -qa "cudaHostAlloc(bounce slab)" $B/bench-before && echo "bench-before has the new scheduler: wrong include order"
grep -qa "cudaHostAlloc(bounce slab)" $B/bench-after || echo "bench-after lacks the new scheduler"
echo "builds: $(( $(date +%s) - t0 )) s"; grep -E "error|Error" "$log" | head -n 30

run() {  # name, timeout, command...
  local name=$1 lim=$2; shift 2
  local t=$(date +%s)
  timeout "$lim" "$@"; local rc=$?
  echo "== $name: rc=$rc, $(( $(date +%s) - t )) s"
}
run "ctest -L gpu" 200 ctest --test-dir $B/cmake -L gpu --output-on-failure > "$OUT/ctest-gpu.log" 2>&1
tail -n 6 "$OUT/ctest-gpu.log"; grep -E "Failed|FAILED|ERROR" "$OUT/ctest-gpu.log" | head -n 20
run "gpu tests without NVRTC" 200 $B/gpu-tests-no-nvrtc > "$OUT/tests-no-nvrtc.log" 2>&1
grep -E "test cases|assertions|ERROR|FAILED" "$OUT/tests-no-nvrtc.log" | head -n 20
[ "${SWEEP:-1}" = 1 ] && run "probe sweep" 120 $B/dma_probe sweep > "$OUT/sweep.jsonl" 2>> "$log"
filter="^transfer/(contiguous|per_block_memcpy|memcpy_batch|per_head_memcpy2d|ours_dma_only_nhd|ours_dma_only_hnd)/(D2H|H2D)/($sizes)KiB/"
for v in before after; do
  f=$filter; [ $v = before ] && f="^transfer/(contiguous|ours_dma_only_nhd|ours_dma_only_hnd)/(D2H|H2D)/(8|32)KiB/"
  run "bench $v" 200 $B/bench-$v --benchmark_filter="$f" --benchmark_out="$OUT/gpu-bench-$v.json" \
    --benchmark_out_format=json >> "$log" 2>&1
done
if [ "${REPEAT:-0}" = 1 ]; then  # the after run again, for its spread
  run "bench after (again)" 200 $B/bench-after --benchmark_filter="$filter" --benchmark_out="$OUT/gpu-bench-after2.json" \
    --benchmark_out_format=json >> "$log" 2>&1
fi
python3 scripts/gpu-table.py "$OUT/gpu-bench-after.json" --before "$OUT/gpu-bench-before.json" > "$OUT/table.md" 2>&1
[ -s "$OUT/gpu-bench-after2.json" ] && { echo "## The after run repeated"; echo;
  python3 scripts/gpu-table.py "$OUT/gpu-bench-after2.json" --before "$OUT/gpu-bench-before.json"; } >> "$OUT/table.md" 2>&1
cat "$OUT/table.md"
[ -s "$OUT/sweep.jsonl" ] && python3 - "$OUT/sweep.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if r["sweep"] == "batch":
        print(f"batch {r['dir']} {r['frag_KiB']:>2}KiB streams={r['streams']} per_call={r['per_call'] or 'all':>5} {r['ratio']:.3f}")
    else:
        print(f"reorder {r['dir']} {r['frag_KiB']:>2}KiB threads={r['threads']} {r['GBps']:.1f} GB/s ({r['ratio']:.3f})")
PY
