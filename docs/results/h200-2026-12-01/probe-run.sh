#!/usr/bin/env bash
# On the GPU machine: the DMA-only probe, then the transfer benchmark's fallback and baseline rows.
#   OUT=dir bash docs/results/h200-2026-12-01/probe-run.sh [label]
set -uo pipefail
cd "$(dirname "$0")/../../.."
D=docs/results/h200-2026-12-01
label=${1:-before}
OUT=${OUT:-$PWD/gpu-out}
B=/tmp/kvortex-probe-build
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$OUT/machine.txt"
t0=$(date +%s)
mkdir -p "$B/benchmarks"
CUDA=/usr/local/cuda
flags=(-std=c++23 -O2 -Wall -Wextra -Wpedantic -Werror -DKVORTEX_WITH_CUDA=1 -DKVORTEX_WITH_NVRTC=1 -Iinclude -I$CUDA/include)
g++ "${flags[@]}" benchmarks/gpu-bench-transfer.cpp -o "$B/benchmarks/kvortex-gpu-bench" -L$CUDA/lib64 -lcudart -lnvrtc \
  -lcrypto -lpthread -lcublas -lbenchmark_main -lbenchmark > "$OUT/build.log" 2>&1 || head -n 40 "$OUT/build.log"
g++ -O2 -std=c++20 -I/usr/local/cuda/include $D/dma_probe.cpp -L/usr/local/cuda/lib64 -lcudart -lpthread -o /tmp/dma_probe || exit 1
echo "build: $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
timeout 240 /tmp/dma_probe > "$OUT/probe-$label.jsonl" 2> "$OUT/probe-$label.err"; echo "probe rc=$? $(( $(date +%s) - t0 )) s"
cat "$OUT/probe-$label.err"
python3 - "$OUT/probe-$label.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "method" in r:
        print(f"{r['dir']} {r['frag_KiB']:>2}KiB {r['layout']:>3} {r['method']:<34} {r['GBps']:6.2f} GB/s  {r['ratio']:.3f}")
    else:
        print(r)
PY
t0=$(date +%s)
export KVORTEX_CACHE_DIR=$B/cubin-cache
timeout 200 "$B/benchmarks/kvortex-gpu-bench" \
  --benchmark_filter='^transfer/(contiguous|per_block_memcpy|memcpy_batch|ours_dma_only_nhd|ours_dma_only_hnd)/(D2H|H2D)/(8|32)KiB/' \
  --benchmark_out="$OUT/gpu-bench-$label.json" --benchmark_out_format=json > "$OUT/bench-$label.log" 2>&1
echo "bench rc=$? $(( $(date +%s) - t0 )) s"
python3 scripts/gpu-table.py "$OUT/gpu-bench-$label.json" > "$OUT/table-$label.md" 2>&1
cat "$OUT/table-$label.md"
