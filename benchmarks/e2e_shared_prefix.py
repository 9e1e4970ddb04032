"""A shared-prefix workload through transformers' continuous batching (`generate_batch`), on the GPU
machine: one long system prompt, many requests with short distinct suffixes, all submitted at once.

A Llama-3-8B-shaped model from a LlamaConfig with random bf16 weights (nothing downloaded), as in
e2e_ttft.py. Each round uses new suffixes; every mode runs the same rounds:
  - recompute:        no prefix cache at all (`allow_block_sharing=False`);
  - gpu_prefix_cache: transformers' own GPU prefix cache, in a fresh manager (the first request
                      computes the system prompt, later ones share its blocks once complete);
  - gpu_prefix_warm:  the same cache, in a persistent manager that already served the system
                      prompt (the prefix is in GPU memory: transformers at its best);
  - kvortex:          a fresh manager (cold GPU cache, as after a restart or once the GPU cache
                      evicted the prefix) over a KVortex engine that holds the system prompt in
                      pinned host memory (`PagedCacheStore`).
Requests per second count from the first request's submission to the last one's end; TTFT is each
request's first token's time minus its submission (queueing included). The kvortex mode's tokens
and log-probabilities are compared with gpu_prefix_warm's (the same computation on the same KV).

    python3 benchmarks/e2e_shared_prefix.py --system 4096 --suffix 128 --requests 32 --json out.json

Needs PyTorch with CUDA, transformers (5.17) and a CUDA build of the kvortex package on PYTHONPATH.
"""

import argparse
import json
import logging
import statistics

import torch
import transformers

import kvortex
from e2e_ttft import build_model
from kvortex.integrations.transformers import PagedCacheStore, engine_settings


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure(out, n):
    if len(out) != n or any(r.error is not None for r in out.values()):
        raise RuntimeError(f"{n - len(out)} requests missing, errors: {[r.error for r in out.values() if r.error][:3]}")
    start = min(r.created_time for r in out.values())
    end = max(r.lifespan[1] for r in out.values())
    ttft = [r.timestamps[0] - r.created_time for r in out.values()]
    tokens = [(list(r.generated_tokens), list(r.logprobs)) for r in out.values()]
    return n / (end - start), ttft, tokens


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", type=int, default=4096, help="tokens of the shared system prompt")
    ap.add_argument("--suffix", type=int, default=128, help="tokens of each request's own suffix")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--block", type=int, default=256, help="the paged cache's block_size (KVortex chunk too)")
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # the persistent manager's notices

    model = build_model(args.layers)
    cfg = model.config
    gen = transformers.GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1)

    def cb(**kw):
        # Every size given: a persistent manager keeps the sizes its first call inferred from that
        # call's workload (one request: one request per batch).
        s = dict(block_size=args.block, num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens,
                 max_requests_per_batch=args.requests, use_cuda_graph=False, use_async_batching=False,
                 return_logprobs=True)
        s.update(kw)
        return transformers.ContinuousBatchingConfig(**s)

    g = torch.Generator().manual_seed(7)
    system = torch.randint(0, cfg.vocab_size, (args.system,), generator=g).tolist()
    warm = system + torch.randint(0, cfg.vocab_size, (args.suffix,), generator=g).tolist()
    rounds = [[system + torch.randint(0, cfg.vocab_size, (args.suffix,), generator=g).tolist()
               for _ in range(args.requests)] for _ in range(args.rounds)]
    n = args.requests

    # A round outside the measurement, so kernels and allocator pools are warm for every mode.
    model.generate_batch(rounds[0][:4], generation_config=gen, continuous_batching_config=cb())

    results = {}

    def record(mode, runs):
        rps = [r for r, _, _ in runs]
        ttft = [t for _, ts, _ in runs for t in ts]
        results[mode] = {"req_per_s": statistics.median(rps), "req_per_s_all": rps,
                         "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99)}
        print(f"{mode:18s} {results[mode]['req_per_s']:8.2f} req/s  TTFT p50 {results[mode]['ttft_p50_ms']:8.1f} ms"
              f"  p99 {results[mode]['ttft_p99_ms']:8.1f} ms", flush=True)
        return runs

    record("recompute", [measure(model.generate_batch(p, generation_config=gen, record_timestamps=True,
                                                      continuous_batching_config=cb(allow_block_sharing=False)), n)
                         for p in rounds])
    record("gpu_prefix_cache", [measure(model.generate_batch(p, generation_config=gen, record_timestamps=True,
                                                             continuous_batching_config=cb()), n) for p in rounds])
    warm_runs = []
    for p in rounds:
        model.generate_batch([warm], generation_config=gen, continuous_batching_config=cb(), persistent_manager=True)
        warm_runs.append(measure(model.generate_batch(p, generation_config=gen, record_timestamps=True,
                                                      continuous_batching_config=cb(), persistent_manager=True), n))
        model.destroy_cached_continuous_batching_manager()
    record("gpu_prefix_warm", warm_runs)

    settings = engine_settings(cfg, capacity_bytes="16GiB", chunk_tokens=args.block)
    with kvortex.Engine(settings, stack="gpu") as engine:
        store = PagedCacheStore(engine, cfg)
        with store.installed():
            model.generate_batch([warm], generation_config=gen, continuous_batching_config=cb())
            store.flush()
            kv_runs = record("kvortex", [measure(model.generate_batch(p, generation_config=gen, record_timestamps=True,
                                                                      continuous_batching_config=cb()), n)
                                         for p in rounds])
        store.flush()
        stats = store.stats()
    same = sum(a == b for (_, _, ta), (_, _, tb) in zip(kv_runs, warm_runs) for a, b in zip(ta, tb))
    results["kvortex"]["store_stats"] = stats
    results["kvortex"]["requests_equal_to_gpu_prefix_warm"] = f"{same}/{n * args.rounds}"
    print(f"kvortex: {stats['restored_tokens']} tokens restored in {stats['restored_requests']} requests; "
          f"tokens and log-probabilities equal to gpu_prefix_warm in {same} of {n * args.rounds} requests")

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "kvortex": kvortex.__version__ if hasattr(kvortex, "__version__") else "", "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
