"""End-to-end time to first token with KVortex under transformers, on the GPU machine.

A request of `length + tail` tokens whose first `length` tokens an earlier request (the prefix
alone) stored. A Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256)
from a LlamaConfig with random bf16 weights (nothing downloaded). For each prompt length:
  - full:    TTFT of a full prefill (the last token's logits, synchronized);
  - hit:     TTFT when the prompt's prefix is in KVortex (the GPU stack, pinned host memory):
             lookup, layer-by-layer retrieve into a staging tensor, DynamicCache built from it, and the
             forward pass over the uncached tail (the last chunk: the last token is never restored);
  - miss overhead: a prefill that also saves its KV (after the forward pass, or layer by layer
             during it), against the prefill alone.
The restored run's first-token logits are compared with the tail run on the original prefill's
cache (must be bitwise equal: the same kernels on the same inputs) and with the full prefill
(bf16 kernel noise: reported, with the argmax agreement).

    python3 benchmarks/e2e_ttft.py --lengths 1024 4096 8192 16384 --json out.json

Needs PyTorch with CUDA, transformers and a CUDA build of the kvortex Python package on PYTHONPATH.
"""

import argparse
import json
import statistics
import time

import torch
import transformers

import kvortex
from kvortex.integrations.transformers import PrefixStore, engine_settings


def build_model(layers):
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=4096, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                   max_position_embeddings=32768, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        try:
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval()


def forward(model, ids, cache=None):
    # Only the last position's logits: a 16k-token prompt's full logits would take 4 GiB.
    return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)


def copy_cache(cache):
    # A fresh DynamicCache over the same tensors, so a timed forward does not grow the original.
    import copy
    return copy.deepcopy(cache)


def timed(fn, reps):
    # The compute stream only: a first token is ready when its stream is, whatever KVortex's own
    # copy streams still do behind it (a queued save).
    out, times = None, []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.current_stream().synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tail", type=int, default=1,
                    help="new tokens after the stored prefix (the request is prefix + tail; 1: one new token)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    model = build_model(args.layers)
    cfg = model.config
    gpu = torch.cuda.get_device_name()
    results = []
    max_len = max(args.lengths)
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    settings = engine_settings(cfg, capacity_bytes=int(max_len * kv_bytes * 1.5) + (1 << 30), chunk_tokens=args.chunk,
                               model_id="bench/llama-3-8b-random")
    with kvortex.Engine(settings, stack="gpu") as engine:
        store = PrefixStore(engine, cfg)
        for n in args.lengths:
            prompt = torch.randint(0, cfg.vocab_size, (1, n + args.tail), device="cuda")
            prefix_ids = prompt[:, :n]
            # Warm-up (kernels, allocator) at this length.
            forward(model, prompt)

            full, full_s, _ = timed(lambda: forward(model, prompt), args.reps)
            full_logits = full.logits[:, -1].float()

            # The miss overhead: a prefill whose KV is saved, against the prefill alone. Each rep
            # saves a prompt KVortex does not hold yet (a save of held chunks deduplicates), either
            # queued after the forward pass (`save(wait=False)`) or layer by layer during it
            # (`saving_cache`); the first token waits for neither.
            _, prefix_s, _ = timed(lambda: forward(model, prefix_ids), args.reps)

            def save_overhead(layerwise):
                times = []
                for _ in range(args.reps):
                    ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
                    if layerwise:
                        fn = lambda: forward(model, ids, store.saving_cache(ids[0]))  # noqa: E731
                    else:
                        def fn():
                            out = forward(model, ids)
                            store.save(ids[0], out.past_key_values, wait=False)
                            return out
                    times.append(timed(fn, 1)[1])
                    store.flush()
                return statistics.median(times)

            save_s = save_overhead(False)
            layer_save_s = save_overhead(True)
            # An earlier request was the prefix alone, and saved it.
            store.save(prefix_ids[0], forward(model, prefix_ids).past_key_values)
            hit_tokens = store.lookup(prompt[0])

            # Reference for the bitwise check: the tail on the original prefill's cache.
            pre = forward(model, prompt[:, :hit_tokens])
            ref_logits = forward(model, prompt[:, hit_tokens:], copy_cache(pre.past_key_values)).logits[:, -1].float()
            # Is the reference itself repeatable (attention over a 1-token query may reduce in any order)?
            ref_again = forward(model, prompt[:, hit_tokens:], copy_cache(pre.past_key_values)).logits[:, -1].float()
            # The restored KV against the prefill's, byte for byte.
            restored_cache, _ = store.restore(prompt[0])
            kv_equal = all(torch.equal(a.keys[..., :hit_tokens, :], b.keys[..., :hit_tokens, :]) and
                           torch.equal(a.values[..., :hit_tokens, :], b.values[..., :hit_tokens, :])
                           for a, b in zip(restored_cache.layers, pre.past_key_values.layers))
            del pre, restored_cache

            def restored():
                cache, hit = store.restore(prompt[0])
                return forward(model, prompt[:, hit:], cache), hit

            (hit_out, hit), hit_s, hit_times = timed(restored, args.reps)
            hit_logits = hit_out.logits[:, -1].float()

            # Restore alone (lookup + retrieve + cache build), for the breakdown.
            _, restore_s, _ = timed(lambda: store.restore(prompt[0]), args.reps)

            # The bound: the prefix KV at the contiguous DMA rate (pinned host -> device, measured
            # now) plus the tail's compute on a cache already in GPU memory.
            kv_total = hit * kv_bytes
            host = torch.empty(kv_total, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(kv_total, dtype=torch.uint8, device="cuda")
            _, dma_s, _ = timed(lambda: dev.copy_(host, non_blocking=True), args.reps)
            del host, dev
            pre = forward(model, prompt[:, :hit])
            _, tail_s, _ = timed(lambda: forward(model, prompt[:, hit:], copy_cache(pre.past_key_values)), args.reps)
            del pre

            r = {
                "gpu": gpu, "tokens": n + args.tail, "restored_tokens": hit, "tail_tokens": n + args.tail - hit,
                "ttft_full_ms": full_s * 1e3, "ttft_hit_ms": hit_s * 1e3, "speedup": full_s / hit_s,
                "restore_ms": restore_s * 1e3,
                "restore_GBps": hit * kv_bytes / restore_s / 1e9,
                "miss_save_overhead": (save_s - prefix_s) / prefix_s,
                "miss_save_overhead_layerwise": (layer_save_s - prefix_s) / prefix_s,
                "dma_GBps": kv_total / dma_s / 1e9, "tail_compute_ms": tail_s * 1e3,
                "bound_ms": (dma_s + tail_s) * 1e3, "ttft_hit_over_bound": hit_s / (dma_s + tail_s),
                "logits_bitwise_equal_to_tail_on_original_cache": bool(torch.equal(hit_logits, ref_logits)),
                "reference_repeatable": bool(torch.equal(ref_logits, ref_again)),
                "restored_kv_bitwise_equal": bool(kv_equal),
                "max_abs_dlogit_vs_full_prefill": float((hit_logits - full_logits).abs().max()),
                "argmax_equal_to_full_prefill": bool(torch.equal(hit_logits.argmax(-1), full_logits.argmax(-1))),
            }
            results.append(r)
            print(json.dumps(r), flush=True)
            del full, hit_out
            torch.cuda.empty_cache()

    print(f"\n{gpu}, Llama-3-8B-shaped ({args.layers} layers, random bf16 weights), chunk {args.chunk} tokens, median of {args.reps}\n")
    print("| prompt tokens | TTFT full prefill | TTFT with KVortex hit | speedup | bound (DMA + tail) | hit / bound | restored / tail tokens | restore (GB/s) | save on a miss: after / during the prefill | logits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        logits = f"KV {'bitwise equal' if r['restored_kv_bitwise_equal'] else 'DIFFERENT'}; logits " + \
                 ("bitwise equal" if r["logits_bitwise_equal_to_tail_on_original_cache"] else
                  "differ" + ("" if r["reference_repeatable"] else " (so does a rerun of the reference)")) + \
                 f" (vs full prefill: max |d| {r['max_abs_dlogit_vs_full_prefill']:.3g}, argmax {'same' if r['argmax_equal_to_full_prefill'] else 'differs'})"
        print(f"| {r['tokens']} | {r['ttft_full_ms']:.1f} ms | {r['ttft_hit_ms']:.1f} ms | {r['speedup']:.1f}x | "
              f"{r['bound_ms']:.1f} ms | {r['ttft_hit_over_bound']:.2f} | "
              f"{r['restored_tokens']} / {r['tail_tokens']} | {r['restore_ms']:.1f} ms ({r['restore_GBps']:.1f}) | "
              f"{100 * r['miss_save_overhead']:+.1f}% / {100 * r['miss_save_overhead_layerwise']:+.1f}% | {logits} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
