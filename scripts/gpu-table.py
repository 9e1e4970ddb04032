#!/usr/bin/env python3
"""Turns kvortex-gpu-bench JSON into Markdown tables (ours and every baseline as ratios to the
contiguous-DMA limit measured in the same run) and, when matplotlib is present, a PNG chart.

    python3 scripts/gpu-table.py gpu.json [--png gpu.png] [--before before.json]

With --before (a run of the same benchmark on an earlier tree), adds a table of the DMA-only
fallback before and after, next to the DMA baselines of the later run.
"""
import argparse
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    ctx = data.get("context", {})
    rows = [b for b in data.get("benchmarks", []) if b.get("run_type", "iteration") == "iteration" and not b.get("error_occurred")]
    return ctx, rows


def split(name):
    # transfer/<method>/<dir>/<size>/... or interference/<method>/<dir>/<size>/...
    parts = name.split("/")
    return parts[0], parts[1], (parts[2] if len(parts) > 2 else ""), (parts[3] if len(parts) > 3 else "")


def transfer_table(rows):
    cells = defaultdict(dict)  # (dir, size) -> method -> (GBps, ratio)
    methods = []
    for b in rows:
        kind, m, d, s = split(b["name"])
        if kind != "transfer":
            continue
        cells[(d, s)][m] = (b.get("GBps", 0.0), b.get("ratio_to_limit", 0.0), b.get("limit_GBps", 0.0))
        if m not in methods:
            methods.append(m)
    if not cells:
        return ""
    order = [m for m in ("ours_nhd", "ours_hnd", "ours_dma_only_nhd", "ours_dma_only_hnd", "contiguous",
                         "per_block_memcpy", "per_head_memcpy2d", "memcpy_batch", "zero_copy_uva") if m in methods]
    order += [m for m in methods if m not in order]
    out = ["| direction | block | limit GB/s | " + " | ".join(order) + " |",
           "|---|---|---|" + "---|" * len(order)]
    size_key = lambda s: int("".join(c for c in s if c.isdigit()) or 0)
    for (d, s) in sorted(cells, key=lambda k: (k[0], size_key(k[1]))):
        row = cells[(d, s)]
        limit = next((v[2] for v in row.values() if v[2]), 0.0)
        vals = []
        for m in order:
            if m in row:
                g, r, _ = row[m]
                vals.append(f"{g:.1f} ({r:.2f})")
            else:
                vals.append("-")
        out.append(f"| {d} | {s} | {limit:.1f} | " + " | ".join(vals) + " |")
    return "GB/s (ratio to one contiguous pinned cudaMemcpyAsync of the same bytes)\n\n" + "\n".join(out)


def transfer_cells(rows):
    cells = {}  # (method, dir, size) -> (GBps, ratio, limit)
    for b in rows:
        kind, m, d, s = split(b["name"])
        if kind == "transfer":
            cells[(m, d, s)] = (b.get("GBps", 0.0), b.get("ratio_to_limit", 0.0), b.get("limit_GBps", 0.0))
    return cells


def fallback_table(before, after):
    """The DMA-only fallback per layout, before and after, beside the DMA baselines (later run)."""
    b, a = transfer_cells(before), transfer_cells(after)
    keys = sorted({(d, s) for (m, d, s) in a if m.startswith("ours_dma_only")},
                  key=lambda k: (k[0], int("".join(c for c in k[1] if c.isdigit()) or 0)))
    if not keys:
        return ""
    fmt = lambda c: f"{c[1]:.2f} ({c[0]:.1f})" if c else "-"
    out = ["| direction | block | layout | limit GB/s | fallback before | fallback after | per_block_memcpy | "
           "memcpy_batch | per_head_memcpy2d |", "|---|---|---|---|---|---|---|---|---|"]
    for d, s in keys:
        for lay in ("nhd", "hnd"):
            m = "ours_dma_only_" + lay
            if (m, d, s) not in a:
                continue
            limit = a[(m, d, s)][2]
            base = [fmt(a.get((x, d, s))) for x in ("per_block_memcpy", "memcpy_batch")]
            head = fmt(a.get(("per_head_memcpy2d", d, s))) if lay == "hnd" else "-"
            out.append(f"| {d} | {s} | {lay.upper()} | {limit:.1f} | {fmt(b.get((m, d, s)))} | {fmt(a[(m, d, s)])} | "
                       + " | ".join(base) + f" | {head} |")
    return ("Ratio to one contiguous pinned cudaMemcpyAsync measured in the same run (GB/s); baselines from the "
            "later run\n\n" + "\n".join(out))


def interference_table(rows):
    out = ["| method | direction | block | copy GB/s | copy / limit | GEMM TFLOP/s | GEMM alone | GEMM loss |",
           "|---|---|---|---|---|---|---|---|"]
    n = 0
    for b in rows:
        kind, m, d, s = split(b["name"])
        if kind != "interference" or m == "gemm_alone":
            continue
        n += 1
        out.append(f"| {m} | {d} | {s} | {b.get('GBps', 0):.1f} | {b.get('ratio_to_limit', 0):.2f} | "
                   f"{b.get('gemm_tflops', 0):.0f} | {b.get('gemm_alone_tflops', 0):.0f} | {b.get('gemm_loss_pct', 0):.1f}% |")
    return "\n".join(out) if n else ""


def pool_table(rows):
    out = ["| pool | size | first chunk servable (s) | whole pool (s) |", "|---|---|---|---|"]
    n = 0
    for b in rows:
        kind, m, s, _ = split(b["name"])
        if kind != "pool_startup":
            continue
        n += 1
        out.append(f"| {m} | {s} | {b.get('first_ready_s', 0):.2f} | {b.get('all_ready_s', 0):.2f} |")
    return "\n".join(out) if n else ""


def chart(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not available: {path} not written)", file=sys.stderr)
        return
    series = defaultdict(dict)
    labels = []
    for b in rows:
        kind, m, d, s = split(b["name"])
        if kind != "transfer":
            continue
        key = f"{d} {s}"
        if key not in labels:
            labels.append(key)
        series[m][key] = b.get("ratio_to_limit", 0.0)
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 1.1), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (m, vals) in enumerate(sorted(series.items())):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [vals.get(k, 0) for k in labels], width, label=m)
    ax.axhline(0.95, color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("bandwidth / contiguous pinned DMA")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--png")
    ap.add_argument("--before")
    a = ap.parse_args()
    ctx, rows = load(a.json)
    print(f"Host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, run {ctx.get('date', '?')}\n")
    if a.before:
        _, before = load(a.before)
        t = fallback_table(before, rows)
        if t:
            print(f"### DMA-only fallback, before and after\n\n{t}\n")
    for title, t in (("Paged KV transfers", transfer_table(rows)),
                     ("Beside a cuBLAS bf16 GEMM 8192^3", interference_table(rows)),
                     ("Pinned pool start-up", pool_table(rows))):
        if t:
            print(f"### {title}\n\n{t}\n")
    if a.png:
        chart(rows, a.png)


if __name__ == "__main__":
    main()
