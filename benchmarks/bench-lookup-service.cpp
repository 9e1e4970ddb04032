// Prefix lookups across processes' sockets: what a scheduler pays to ask its workers.
//
// lookup_service/direct/tokens:8192: engine::lookup of a fully stored 8192-token prompt (32 chunks
// of 256 tokens, SHA-256 keys), in this thread: the baseline.
// lookup_service/round_trip/servers:{1,2}: lookup_client::send of the same prompt to
// 1 or 2 lookup_servers (each over its own engine holding the prompt, on a Unix socket in a fresh
// directory) and poll until every answer is in. The servers run on their own threads, as a
// worker's would. Counter direct_us: the direct lookup, timed in the same iterations (outside the
// reported time), so the reported time minus direct_us is what the socket, the copies of 32 KiB of
// token ids and the wake-ups add to the lookup itself.

#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include <stdlib.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "kvortex/kvortex.hpp"
#include "kvortex/lookup_client.hpp"
#include "kvortex/lookup_server.hpp"

namespace {

using kvb::take;
using kvortex::token_id;
constexpr std::size_t tokens_per_prompt = 8192;

kvortex::engine_config config() {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "bench";
  cfg.geometry = {.num_layers = 1, .kv_planes = 2, .kv_heads = 1, .head_dim = 8, .element_bytes = 2};
  cfg.chunk_tokens = 256;
  cfg.capacity_bytes = std::size_t{64} << 20;
  cfg.transfer_threads = 1;
  return cfg;
}

std::vector<token_id> prompt() {
  std::mt19937 rng(3);
  std::uniform_int_distribution<token_id> dist(0, 128255);
  std::vector<token_id> t(tokens_per_prompt);
  for (auto& x : t) x = dist(rng);
  return t;
}

kvortex::host_engine stored_engine(const std::vector<token_id>& tokens) {
  const auto cfg = config();
  auto e = take(kvortex::host_engine::create(cfg), "create");
  std::vector<std::byte> bytes(cfg.geometry.kv_planes * tokens.size() * cfg.geometry.row_bytes(), std::byte{7});
  std::byte* layers[] = {bytes.data()};
  auto layout = take(kvortex::kv_layout::contiguous(layers, cfg.geometry, tokens.size()), "layout");
  (void)take(take(e.store(tokens, layout), "store").wait(), "store wait");
  return e;
}

void direct(benchmark::State& state) {
  const auto tokens = prompt();
  auto e = stored_engine(tokens);
  for (auto _ : state) {
    auto n = e.lookup(tokens);
    if (!n || *n != tokens_per_prompt) {
      state.SkipWithError("lookup missed");
      break;
    }
    benchmark::DoNotOptimize(n);
  }
}

void round_trip(benchmark::State& state) {
  const auto servers = static_cast<std::size_t>(state.range(0));
  const auto tokens = prompt();
  char tmpl[] = "/tmp/kvortex-bench-lookup-XXXXXX";
  const std::filesystem::path dir = ::mkdtemp(tmpl);
  std::vector<kvortex::host_engine> engines;
  engines.reserve(servers);
  std::vector<kvortex::lookup_server> running;
  kvortex::lookup_client_config cc;
  for (std::size_t i = 0; i < servers; ++i) {
    engines.push_back(stored_engine(tokens));
    auto* e = &engines.back();
    std::string name = "server-";
    name += std::to_string(i);  // (not "s" + to_string: GCC 12 warns of a restrict overlap there)
    const auto path = (dir / name).string();
    running.push_back(take(kvortex::lookup_server::start(
                               {.path = path}, [e](std::span<const token_id> t, kvortex::key_salt s) { return e->lookup(t, s); }),
                           "lookup_server"));
    cc.paths.push_back(path);
  }
  auto client = take(kvortex::lookup_client::create(cc), "lookup_client");
  double direct_ns = 0;
  for (auto _ : state) {
    const auto id = client.send(tokens);
    if (!id) {
      state.SkipWithError("send failed");
      break;
    }
    auto got = client.poll(*id, std::chrono::seconds(5));
    if (!got || !*got || **got != tokens_per_prompt) {
      state.SkipWithError("the servers did not answer the full hit");
      break;
    }
    state.PauseTiming();
    const auto t0 = std::chrono::steady_clock::now();
    auto n = engines[0].lookup(tokens);
    direct_ns += std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    benchmark::DoNotOptimize(n);
    state.ResumeTiming();
  }
  const double iters = static_cast<double>(std::max<benchmark::IterationCount>(state.iterations(), 1));
  state.counters["direct_us"] = direct_ns / iters / 1000.0;
  running.clear();
  std::filesystem::remove_all(dir);
}

}  // namespace

BENCHMARK(direct)->Name("lookup_service/direct/tokens:8192")->Unit(benchmark::kMicrosecond);
BENCHMARK(round_trip)->Name("lookup_service/round_trip")->ArgName("servers")->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseRealTime();
