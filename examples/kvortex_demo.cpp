// kvortex-demo: replays a synthetic multi-turn chat workload through kvortex::host_engine (or, with
// --disk / --redis, a host engine with storage tiers below it).
//
// Every conversation starts with the same system prompt and grows turn by turn; turns of different
// conversations are interleaved at random. Each turn looks up the conversation so far, retrieves the
// cached prefix into a vLLM-style paged cache (FlashAttention, NHD, 16-token blocks, a fresh random
// block table per turn), "prefills" the rest, and stores the whole prompt. The KV of a token is a
// deterministic function of (token id, position), so retrieved bytes can be checked.
//
// With --disk DIR (and/or --redis HOST:PORT) the engine keeps a disk tier (a Redis tier) below host
// memory, write-through: run it, stop it, run it again with the same seed, and the second run's
// hits come from the tiers (the table says how many tokens each tier served).

#include <kvortex/kvortex.hpp>
#include <kvortex/logging.hpp>
#if defined(KVORTEX_WITH_XXHASH)
#include <kvortex/tiers/disk_tier.hpp>
#endif
#if defined(KVORTEX_WITH_HIREDIS) && defined(KVORTEX_WITH_XXHASH)
#include <kvortex/tiers/redis_tier.hpp>
#define KVORTEX_DEMO_REDIS 1
#endif

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct model {
  const char* name;
  kvortex::kv_geometry geometry;
};
constexpr model llama3_8b{"Llama-3-8B",
                          {.num_layers = 32, .kv_planes = 2, .kv_heads = 8, .head_dim = 128, .element_bytes = 2}};
constexpr model llama32_1b{"Llama-3.2-1B",
                           {.num_layers = 16, .kv_planes = 2, .kv_heads = 8, .head_dim = 64, .element_bytes = 2}};

struct options {
  model m = llama3_8b;
  std::size_t conversations = 8;
  std::size_t turns = 6;
  std::size_t capacity_mib = 1024;
  std::size_t system_tokens = 1024;
  std::size_t chunk_tokens = 256;
  std::uint64_t seed = 1;
  std::string disk;               // --disk DIR: a disk tier there
  std::size_t disk_mib = 8192;    // its capacity
  std::string redis;              // --redis HOST:PORT: a Redis tier on that server
  bool require_tier_hits = false; // fail unless some hit came from a tier below memory
};

constexpr std::size_t block_tokens = 16;
constexpr std::size_t min_user = 50, max_user = 250, min_reply = 150, max_reply = 350;
constexpr std::size_t samples_per_turn = 8;  // tokens whose every row is checked after a retrieve

void usage(std::FILE* to) {
  std::fprintf(to,
               "usage: kvortex-demo [--quick] [--conversations N] [--turns N] [--capacity-mib N] [--seed N]\n"
               "  Replays a multi-turn chat workload through kvortex::host_engine and reports hit rate,\n"
               "  evictions and copy bandwidth. Returns non-zero if any retrieved byte is wrong.\n"
               "  --quick            small run for CI: %s geometry, 6 conversations x 4 turns, 128 MiB\n"
               "  --conversations N  concurrent conversations (default 8)\n"
               "  --turns N          turns per conversation (default 6)\n"
               "  --capacity-mib N   store capacity in MiB (default 1024)\n"
               "  --seed N           workload seed (default 1)\n"
               "  --disk DIR         keep a disk tier in DIR below host memory (write-through); a rerun\n"
               "                     with the same seed is served from it\n"
               "  --disk-mib N       the disk tier's capacity in MiB (default 8192)\n"
               "  --redis HOST:PORT  keep a Redis tier on that server below host memory (and the disk)\n"
               "  --require-tier-hits  exit non-zero unless some hit tokens came from a tier below memory\n",
               llama32_1b.name);
}

// Parses the command line; returns false (after printing why) if it is not usable.
bool parse(int argc, char** argv, options& o, bool& help) {
  const auto number = [&](int& i, std::size_t& out) {
    if (i + 1 >= argc) {
      std::fprintf(stderr, "error: %s needs a value\n", argv[i]);
      return false;
    }
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = std::strtoull(argv[++i], &end, 10);
    if (errno != 0 || end == argv[i] || *end != '\0' || v == 0 || argv[i][0] == '-') {
      std::fprintf(stderr, "error: %s wants a positive integer, got '%s'\n", argv[i - 1], argv[i]);
      return false;
    }
    out = static_cast<std::size_t>(v);
    return true;
  };
  // --quick sets defaults that the other options may then override, wherever it appears.
  for (int i = 1; i < argc; ++i)
    if (std::string_view(argv[i]) == "--quick") {
      o.m = llama32_1b;
      o.conversations = 6;
      o.turns = 4;
      o.capacity_mib = 128;
    }
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    std::size_t v = 0;
    if (a == "--help" || a == "-h") {
      help = true;
    } else if (a == "--quick") {
    } else if (a == "--conversations") {
      if (!number(i, o.conversations)) return false;
    } else if (a == "--turns") {
      if (!number(i, o.turns)) return false;
    } else if (a == "--capacity-mib") {
      if (!number(i, o.capacity_mib)) return false;
    } else if (a == "--seed") {
      if (!number(i, v)) return false;
      o.seed = v;
    } else if (a == "--disk" || a == "--redis") {
      if (i + 1 >= argc || argv[i + 1][0] == '\0') {
        std::fprintf(stderr, "error: %s needs a value\n", argv[i]);
        return false;
      }
      (a == "--disk" ? o.disk : o.redis) = argv[++i];
    } else if (a == "--disk-mib") {
      if (!number(i, o.disk_mib)) return false;
    } else if (a == "--require-tier-hits") {
      o.require_tier_hits = true;
    } else {
      std::fprintf(stderr, "error: unknown option '%s'\n", argv[i]);
      usage(stderr);
      return false;
    }
  }
  if (o.conversations > 2000 || o.turns > 1000 || o.capacity_mib > (std::size_t{1} << 30)) {
    std::fprintf(stderr, "error: at most 2000 conversations, 1000 turns and 1 PiB of capacity\n");
    return false;
  }
  return true;
}

constexpr std::uint64_t mix(std::uint64_t x) {  // splitmix64's finalizer
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The simulated model output: one layer-plane row of token `id` at position `pos`.
std::uint64_t row_seed(kvortex::token_id id, std::size_t pos, std::size_t layer, std::size_t plane) {
  return mix((static_cast<std::uint64_t>(static_cast<std::uint32_t>(id)) << 32) ^ (pos << 8) ^ (layer << 1) ^ plane);
}
void fill_row(std::byte* row, std::size_t bytes, std::uint64_t seed) {
  for (std::size_t w = 0; w < bytes / 8; ++w) {
    const std::uint64_t v = seed + w * 0xD1B54A32D192ED03ULL;
    std::memcpy(row + 8 * w, &v, 8);
  }
}
bool row_matches(const std::byte* row, std::size_t bytes, std::uint64_t seed) {
  for (std::size_t w = 0; w < bytes / 8; ++w) {
    std::uint64_t v;
    std::memcpy(&v, row + 8 * w, 8);
    if (v != seed + w * 0xD1B54A32D192ED03ULL) return false;
  }
  return true;
}

// The inference engine's paged KV cache: per layer [2][num_blocks][16][kv_heads][head_dim].
class paged_cache {
 public:
  paged_cache(const kvortex::kv_geometry& g, std::size_t num_blocks) : g_(g), num_blocks_(num_blocks) {
    for (std::size_t l = 0; l < g.num_layers; ++l) {
      const std::size_t bytes = 2 * num_blocks * block_tokens * g.row_bytes();
      tensors_.push_back(std::make_unique_for_overwrite<std::byte[]>(bytes));
      ptrs_.push_back(tensors_.back().get());
      // Inference engines allocate their cache up front; fault it in now so copies are not timed
      // with page faults.
      std::memset(ptrs_.back(), 0, bytes);
    }
  }
  [[nodiscard]] std::span<std::byte* const> layer_ptrs() const { return ptrs_; }
  [[nodiscard]] std::byte* row(std::size_t layer, std::size_t plane, std::span<const std::int32_t> table,
                               std::size_t t) const {
    const auto block = static_cast<std::size_t>(table[t / block_tokens]);
    return ptrs_[layer] + ((plane * num_blocks_ + block) * block_tokens + t % block_tokens) * g_.row_bytes();
  }

 private:
  kvortex::kv_geometry g_;
  std::size_t num_blocks_;
  std::vector<std::unique_ptr<std::byte[]>> tensors_;
  std::vector<std::byte*> ptrs_;
};

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

int report(const kvortex::error& e) {
  std::fprintf(stderr, "error: %s\n", e.what().c_str());
  return 1;
}

double gib(std::uint64_t b) { return static_cast<double>(b) / double(1ULL << 30); }

// "512 MiB" below a GiB, "3.25 GiB" above.
std::string size_str(std::uint64_t b) {
  char buf[32];
  if (b < (1ULL << 30))
    std::snprintf(buf, sizeof buf, "%.0f MiB", static_cast<double>(b) / double(1ULL << 20));
  else
    std::snprintf(buf, sizeof buf, "%.2f GiB", gib(b));
  return buf;
}

// The workload on any engine stack.
template <class Engine>
int run(Engine& engine_obj, const options& o, const kvortex::engine_config& cfg, const std::string& stack) {
  auto* engine = &engine_obj;
  const auto& g = o.m.geometry;
  // The paged cache holds one request at a time, at most this long.
  const std::size_t max_tokens = o.system_tokens + o.turns * (max_user + max_reply);
  const std::size_t pool_blocks = (max_tokens + block_tokens - 1) / block_tokens + 64;
  paged_cache cache(g, pool_blocks);
  auto layout =
      kvortex::kv_layout::flash_attn(cache.layer_ptrs(), g, pool_blocks, block_tokens, kvortex::kv_order::nhd);
  if (!layout) return report(layout.error());

  std::mt19937_64 rng(o.seed), sample_rng(o.seed ^ 0x5bd1e995);
  const auto uniform = [&](std::size_t lo, std::size_t hi) {
    return std::uniform_int_distribution<std::size_t>(lo, hi)(rng);
  };
  const auto token = [&] { return static_cast<kvortex::token_id>(uniform(0, 128255)); };  // Llama-3 vocabulary

  std::vector<kvortex::token_id> system_prompt(o.system_tokens);
  for (auto& t : system_prompt) t = token();
  // Each conversation: the system prompt, then every finished turn.
  std::vector<std::vector<kvortex::token_id>> convs(o.conversations, system_prompt);
  std::vector<std::size_t> schedule;  // which conversation takes each turn
  for (std::size_t c = 0; c < o.conversations; ++c) schedule.insert(schedule.end(), o.turns, c);
  std::shuffle(schedule.begin(), schedule.end(), rng);
  std::vector<std::int32_t> free_blocks(pool_blocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);

  const std::size_t token_bytes = g.token_bytes();
  const double avg_turn = double(min_user + max_user + min_reply + max_reply) / 2;
  const double unique_kv =
      double(token_bytes) * (double(o.system_tokens) + double(o.conversations * o.turns) * avg_turn);
  std::printf("kvortex-demo: %zu conversations x %zu turns, interleaved at random (seed %llu)\n", o.conversations,
              o.turns, static_cast<unsigned long long>(o.seed));
  std::printf("  model       %s: %u layers, %u KV heads x %u, bf16 -> %zu KiB of KV per token\n", o.m.name,
              g.num_layers, g.kv_heads, g.head_dim, token_bytes >> 10);
  std::printf("  prompts     %zu-token system prompt, then %zu-%zu user + %zu-%zu reply tokens per turn\n",
              o.system_tokens, min_user, max_user, min_reply, max_reply);
  std::printf(
      "  store       %s, %zu-token chunks (%zu MiB), capacity %zu MiB (%zu chunks), ~%s of "
      "distinct KV\n",
      stack.c_str(), o.chunk_tokens, cfg.chunk_bytes() >> 20, o.capacity_mib, cfg.capacity_bytes / cfg.chunk_bytes(),
      size_str(static_cast<std::uint64_t>(unique_kv)).c_str());
  std::printf("  paged cache FlashAttention NHD, %zu blocks of %zu tokens (%.0f MiB), random block table per turn\n",
              pool_blocks, block_tokens, double(pool_blocks * block_tokens * token_bytes) / double(1 << 20));

  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  std::uint64_t prompt_tokens = 0, reused_tokens = 0, computed_tokens = 0, verify_failures = 0, sampled = 0;
  std::uint64_t memory_hit_tokens = 0, short_retrieves = 0;
  std::vector<std::pair<std::string, std::uint64_t>> tier_hit_tokens;  // per tier below memory
  double store_s = 0, retrieve_s = 0, prefill_s = 0;
  std::vector<std::size_t> sample;
  const auto t_start = clock_type::now();

  for (std::size_t turn = 0; turn < schedule.size(); ++turn) {
    auto& tokens = convs[schedule[turn]];
    const std::size_t user = uniform(min_user, max_user);
    for (std::size_t i = 0; i < user; ++i) tokens.push_back(token());
    const std::size_t n = tokens.size();
    prompt_tokens += n;

    // This request's pages: a random set of blocks, as a paged allocator leaves them.
    const std::size_t pages = (n + block_tokens - 1) / block_tokens;
    std::shuffle(free_blocks.begin(), free_blocks.end(), rng);
    const std::span<const std::int32_t> table(free_blocks.data(), pages);

    auto where = engine->lookup_tiers(tokens);
    if (!where) return report(where.error());
    const std::size_t* hit = &where->tokens;
    std::size_t served = 0;  // what the retrieve delivered: with tiers it may stop short of the lookup

    if (*hit > 0) {
      // Poison the sampled rows first, so stale bytes from an earlier turn cannot pass the check.
      sample.clear();
      sample.push_back(0);
      sample.push_back(*hit - 1);
      // From their own generator: the workload must not depend on the hits, so a rerun with the
      // same seed replays the same prompts.
      for (std::size_t i = 2; i < samples_per_turn; ++i)
        sample.push_back(std::uniform_int_distribution<std::size_t>(0, *hit - 1)(sample_rng));
      for (const std::size_t t : sample)
        for (std::size_t l = 0; l < g.num_layers; ++l)
          for (std::size_t p = 0; p < 2; ++p) std::memset(cache.row(l, p, table, t), 0xA5, g.row_bytes());

      const auto t0 = clock_type::now();
      auto ticket = engine->retrieve(std::span(tokens).first(*hit), *layout, table);
      if (!ticket) return report(ticket.error());
      auto got = ticket->wait();
      retrieve_s += seconds_since(t0);
      if (!got) return report(got.error());
      served = *got;
      if (*got > *hit) {
        std::fprintf(stderr, "error: lookup found %zu tokens but retrieve copied %zu\n", *hit, *got);
        ++verify_failures;
      } else if (*got < *hit) {
        // A chunk a tier listed could not come up (lost, slow, corrupt): the hit ends there, and
        // the rest is prefilled. Only in memory is this an error.
        ++short_retrieves;
        if (where->memory_tokens > *got) {
          std::fprintf(stderr, "error: %zu tokens were in memory but retrieve copied %zu\n", where->memory_tokens, *got);
          ++verify_failures;
        }
      }
      reused_tokens += *got;
      if (*got == *hit) {
        memory_hit_tokens += where->memory_tokens;
        for (std::size_t j = 0; j < where->tiers.size(); ++j) {
          if (tier_hit_tokens.size() <= j) tier_hit_tokens.emplace_back(std::string(where->tiers[j].tier), 0);
          tier_hit_tokens[j].second += where->tiers[j].tokens;
        }
      }
      for (const std::size_t t : sample) {
        if (t >= served) continue;  // not delivered: prefilled below
        ++sampled;
        std::size_t bad_rows = 0;
        for (std::size_t l = 0; l < g.num_layers; ++l)
          for (std::size_t p = 0; p < 2; ++p)
            bad_rows += !row_matches(cache.row(l, p, table, t), g.row_bytes(), row_seed(tokens[t], t, l, p));
        if (bad_rows != 0 && verify_failures++ < 5)
          std::fprintf(stderr, "error: turn %zu: %zu rows of token %zu differ from what was stored\n", turn, bad_rows,
                       t);
      }
    }

    // "Prefill" the tokens that were not cached.
    const auto t1 = clock_type::now();
    for (std::size_t t = served; t < n; ++t)
      for (std::size_t l = 0; l < g.num_layers; ++l)
        for (std::size_t p = 0; p < 2; ++p)
          fill_row(cache.row(l, p, table, t), g.row_bytes(), row_seed(tokens[t], t, l, p));
    prefill_s += seconds_since(t1);
    computed_tokens += n - served;

    const auto t2 = clock_type::now();
    auto ticket = engine->store(tokens, *layout, table);
    if (!ticket) return report(ticket.error());
    auto stored = ticket->wait();
    store_s += seconds_since(t2);
    if (!stored) return report(stored.error());

    // The reply becomes part of the conversation.
    const std::size_t reply = uniform(min_reply, max_reply);
    for (std::size_t i = 0; i < reply; ++i) tokens.push_back(token());

    const std::size_t done = turn + 1;
    const double rate = 100.0 * double(reused_tokens) / double(prompt_tokens);
    if (tty) {
      constexpr int width = 40;
      const int filled = static_cast<int>(width * done / schedule.size());
      std::printf("\r  [%.*s%*s] %zu/%zu turns, hit rate %5.1f%%, %llu evictions", filled,
                  "########################################", width - filled, "", done, schedule.size(), rate,
                  static_cast<unsigned long long>(engine->stats().evictions));
      if (done == schedule.size()) std::printf("\n");
      std::fflush(stdout);
    } else if (done * 10 / schedule.size() != turn * 10 / schedule.size()) {
      std::printf("  %3zu%%  %zu/%zu turns, hit rate %5.1f%%, %llu evictions, %.1f s\n", done * 100 / schedule.size(),
                  done, schedule.size(), rate, static_cast<unsigned long long>(engine->stats().evictions),
                  seconds_since(t_start));
    }
  }
  engine->flush();  // the tiers hold every stored chunk before the table is printed
  const double wall = seconds_since(t_start);
  const auto s = engine->stats();

  const auto u = [](std::uint64_t v) { return static_cast<unsigned long long>(v); };
  std::printf("\n%-30s %s\n%s\n", "metric", "value", std::string(50, '-').c_str());
  std::printf("%-30s %zu\n", "turns", schedule.size());
  std::printf("%-30s %llu\n", "prompt tokens", u(prompt_tokens));
  std::printf("%-30s %.1f%%\n", "hit rate (tokens)", 100.0 * double(reused_tokens) / double(prompt_tokens));
  std::printf("%-30s %llu (%s of KV)\n", "tokens not recomputed", u(reused_tokens),
              size_str(reused_tokens * token_bytes).c_str());
  std::printf("%-30s %llu\n", "tokens prefilled", u(computed_tokens));
  std::uint64_t below = 0;
  if (!s.tiers.empty()) {
    std::printf("%-30s %llu\n", "  of the hits, from memory", u(memory_hit_tokens));
    for (const auto& [name, n] : tier_hit_tokens) {
      std::printf("%-30s %llu\n", ("  of the hits, from " + name).c_str(), u(n));
      below += n;
    }
    for (const auto& t : s.tiers)
      std::printf("%-30s %llu written, %llu read, %llu errors, %llu entries (%s)\n", (t.name + " tier").c_str(),
                  u(t.tier.writes), u(t.tier.hits), u(t.tier.errors()), u(t.tier.entries), size_str(t.tier.bytes_held).c_str());
    std::printf("%-30s %llu queued, %llu dropped\n", "demotions", u(s.demotions_queued), u(s.demotions_dropped));
    std::printf("%-30s %llu\n", "retrieves short of the lookup", u(short_retrieves));
  }
  std::printf("%-30s %llu\n", "chunks stored", u(s.stored_chunks));
  std::printf("%-30s %llu\n", "chunks evicted", u(s.evictions));
  std::printf("%-30s %llu\n", "chunks deduplicated", u(s.deduplicated_chunks));
  std::printf("%-30s %llu\n", "chunks rejected", u(s.rejected_chunks));
  std::printf("%-30s %s\n", "bytes stored", size_str(s.bytes_stored).c_str());
  std::printf("%-30s %s\n", "bytes loaded", size_str(s.bytes_loaded).c_str());
  std::printf("%-30s %.2f GB/s (%.2f s)\n", "store bandwidth",
              store_s > 0 ? double(s.bytes_stored) / store_s / 1e9 : 0.0, store_s);
  std::printf("%-30s %.2f GB/s (%.2f s)\n", "retrieve bandwidth",
              retrieve_s > 0 ? double(s.bytes_loaded) / retrieve_s / 1e9 : 0.0, retrieve_s);
  std::printf("%-30s %.2f s\n", "simulated prefill (fill) time", prefill_s);
  std::printf("%-30s %s / %s\n", "peak bytes / capacity", size_str(s.peak_bytes).c_str(),
              size_str(s.capacity_bytes).c_str());
  std::printf("%-30s %llu of %llu sampled tokens\n", "verify failures", u(verify_failures), u(sampled));
  std::printf("%-30s %.2f s\n", "wall time", wall);

  if (s.peak_bytes > s.capacity_bytes) {
    std::fprintf(stderr, "error: peak bytes exceed the capacity\n");
    return 1;
  }
  if (s.transfer_failures != 0) {
    std::fprintf(stderr, "error: %llu transfers failed\n", u(s.transfer_failures));
    return 1;
  }
  if (verify_failures != 0) {
    std::fprintf(stderr, "error: %llu verify failures\n", u(verify_failures));
    return 1;
  }
  if (o.require_tier_hits && below == 0) {
    std::fprintf(stderr, "error: --require-tier-hits: no hit came from a tier below memory\n");
    return 1;
  }
  return 0;
}

#if defined(KVORTEX_WITH_XXHASH)
// The tiers asked for, opened; their namespace is the engine's.
kvortex::result<kvortex::disk_tier> open_disk(const options& o, const kvortex::engine_config& cfg) {
  kvortex::disk_tier_config d;
  d.directory = o.disk;
  d.capacity_bytes = std::uint64_t{o.disk_mib} << 20;
  auto ns = kvortex::tier_namespace<kvortex::sha256_hasher>(cfg);
  if (!ns) return std::unexpected(ns.error());
  d.ns = *ns;
  return kvortex::disk_tier::open(d);
}
#endif
#if defined(KVORTEX_DEMO_REDIS)
kvortex::result<kvortex::redis_tier> open_redis(const options& o, const kvortex::engine_config& cfg) {
  kvortex::redis_tier_config r;
  auto ep = kvortex::redis_endpoint::parse(o.redis);
  if (!ep) return std::unexpected(ep.error());
  r.servers = {*ep};
  r.require_connection = true;  // a demo pointed at a server that is not there should say so
  r.command_timeout = std::chrono::milliseconds(2000);  // 8 MiB chunks on a busy machine
  auto ns = kvortex::tier_namespace<kvortex::sha256_hasher>(cfg);
  if (!ns) return std::unexpected(ns.error());
  r.ns = *ns;
  return kvortex::redis_tier::open(r);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  options o;
  bool help = false;
  if (!parse(argc, argv, o, help)) return 2;
  if (help) {
    usage(stdout);
    return 0;
  }
  // What an operator must hear about (a tier lost, corrupt entries, dropped demotions) to stderr.
  kvortex::set_log_sink(kvortex::stderr_log_sink(), kvortex::log_level::warning);
  kvortex::engine_config cfg;
  cfg.ns.model_id = o.m.name;
  cfg.geometry = o.m.geometry;
  cfg.chunk_tokens = o.chunk_tokens;
  cfg.block_tokens = block_tokens;
  cfg.capacity_bytes = o.capacity_mib << 20;
  cfg.tiering.write = kvortex::write_policy::write_through;

  if (o.disk.empty() && o.redis.empty()) {
    auto engine = kvortex::host_engine::create(cfg);
    if (!engine) return report(engine.error());
    return run(*engine, o, cfg, "host_engine");
  }
#if !defined(KVORTEX_WITH_XXHASH)
  std::fprintf(stderr, "error: --disk and --redis need xxHash (Debian: libxxhash-dev) when KVortex is configured\n");
  return 2;
#else
  if (!o.disk.empty() && o.redis.empty()) {
    auto disk = open_disk(o, cfg);
    if (!disk) return report(disk.error());
    auto engine = kvortex::tiered_host_engine<kvortex::disk_tier>::create(
        cfg, kvortex::tiered_backend<kvortex::cpu_backend, kvortex::disk_tier>(kvortex::cpu_backend{}, std::move(*disk)));
    if (!engine) return report(engine.error());
    return run(*engine, o, cfg, "host_engine + disk tier (" + o.disk + ")");
  }
#if !defined(KVORTEX_DEMO_REDIS)
  std::fprintf(stderr, "error: --redis needs hiredis (Debian: libhiredis-dev) when KVortex is configured\n");
  return 2;
#else
  auto redis = open_redis(o, cfg);
  if (!redis) return report(redis.error());
  if (o.disk.empty()) {
    auto engine = kvortex::tiered_host_engine<kvortex::redis_tier>::create(
        cfg, kvortex::tiered_backend<kvortex::cpu_backend, kvortex::redis_tier>(kvortex::cpu_backend{}, std::move(*redis)));
    if (!engine) return report(engine.error());
    return run(*engine, o, cfg, "host_engine + Redis tier (" + o.redis + ")");
  }
  auto disk = open_disk(o, cfg);
  if (!disk) return report(disk.error());
  auto engine = kvortex::tiered_host_engine<kvortex::disk_tier, kvortex::redis_tier>::create(
      cfg, kvortex::tiered_backend<kvortex::cpu_backend, kvortex::disk_tier, kvortex::redis_tier>(
               kvortex::cpu_backend{}, std::move(*disk), std::move(*redis)));
  if (!engine) return report(engine.error());
  return run(*engine, o, cfg, "host_engine + disk tier (" + o.disk + ") + Redis tier (" + o.redis + ")");
#endif
#endif
}
