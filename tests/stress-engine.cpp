// Stress: eight threads and a monitor mix every engine call on a capacity of 32 chunks, so writes
// evict all the time, for KVORTEX_STRESS_SECONDS (default 10) a case: token and key APIs, layered
// transfers whose layers go in random order and that finish, fail or are dropped, invalid calls,
// stats and their Prometheus text. Every byte read back is checked against the KV it was made
// from. The monitor checks the capacity and every snapshot. Once the threads stop, the counters
// must equal what the threads did and every held chunk must load with the bytes it was written
// with. The shutdown cases stop the engine under the same load, then destroy it while transfers
// and tickets are still held.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <latch>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>

using namespace kvortex;

namespace {

using steady = std::chrono::steady_clock;
using seconds_f = std::chrono::duration<double>;

double stress_seconds() {
  if (const char* s = std::getenv("KVORTEX_STRESS_SECONDS")) {
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    if (end != s && v > 0) return v;
  }
  return 10.0;
}

constexpr unsigned worker_threads = 8;
constexpr std::size_t capacity_chunks = 32;
constexpr std::size_t prefixes = 4, tails = 16, pool_keys = 64;
constexpr std::size_t graveyard_cap = 32;  // caches a dropped transfer may still touch, per thread
constexpr std::byte sentinel{0x5A};        // what a destination holds before anything is copied

// ----------------------------------------------------------------------------------------------
// Failures seen on any thread, reported once by the test's own thread: the first distinct
// messages, each with how often it came.
class problem_log {
 public:
  void add(std::string what) {
    std::lock_guard lk(m_);
    ++count_;
    const auto it = std::find_if(first_.begin(), first_.end(), [&](const auto& f) { return f.first == what; });
    if (it != first_.end())
      ++it->second;
    else if (first_.size() < 25)
      first_.emplace_back(std::move(what), 1);
  }
  [[nodiscard]] std::size_t count() const {
    std::lock_guard lk(m_);
    return count_;
  }
  [[nodiscard]] std::string summary() const {
    std::lock_guard lk(m_);
    std::string s = std::to_string(count_) + " problem(s)";
    for (const auto& [what, n] : first_) s += "\n  " + std::to_string(n) + "x " + what;
    return s;
  }

 private:
  mutable std::mutex m_;
  std::size_t count_{0};
  std::vector<std::pair<std::string, std::size_t>> first_;
};

// Turns a hang into a failure with a message: the process ends if `limit` passes first.
class watchdog {
 public:
  watchdog(seconds_f limit, std::string what)
      : th_([this, limit, what = std::move(what)] {
          std::unique_lock lk(m_);
          if (!cv_.wait_for(lk, limit, [&] { return done_; })) {
            std::fprintf(stderr, "stress: %s still running after %.0f s: a hang\n", what.c_str(), limit.count());
            std::fflush(stderr);
            std::_Exit(124);
          }
        }) {}
  watchdog(const watchdog&) = delete;
  watchdog& operator=(const watchdog&) = delete;
  ~watchdog() {
    {
      std::lock_guard lk(m_);
      done_ = true;
    }
    cv_.notify_all();
    th_.join();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool done_{false};
  std::thread th_;  // last: starts once the members above exist
};

// ----------------------------------------------------------------------------------------------
// Prometheus text: syntax, families, histogram shape, and agreement with the snapshot rendered.

bool metric_name(std::string_view n) {
  if (n.empty()) return false;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool label_name(std::string_view n) { return metric_name(n) && n.find(':') == std::string_view::npos; }

std::optional<double> prom_number(std::string_view s) {
  if (s == "+Inf") return HUGE_VAL;
  if (s == "-Inf") return -HUGE_VAL;
  if (s == "NaN") return std::nan("");
  if (s.empty()) return std::nullopt;
  const std::string str(s);
  char* end = nullptr;
  const double v = std::strtod(str.c_str(), &end);
  if (end != str.c_str() + str.size()) return std::nullopt;
  return v;
}

struct prom_sample {
  std::string name, le;  // le: the bucket label, empty elsewhere
  double value;
};

// Problems of `text` as a rendering of `s` (empty when it is valid and agrees).
std::vector<std::string> prometheus_problems(const std::string& text, const engine_stats& s) {
  std::vector<std::string> bad;
  if (text.empty() || text.back() != '\n') bad.push_back("text does not end with a newline");
  std::map<std::string, std::string, std::less<>> types;
  std::map<std::string, std::vector<prom_sample>, std::less<>> families;
  std::map<std::string, double, std::less<>> plain;  // samples without labels
  std::size_t at = 0;
  while (at < text.size() && bad.size() < 8) {
    const std::size_t eol = std::min(text.find('\n', at), text.size());
    const std::string_view line(text.data() + at, eol - at);
    at = eol + 1;
    if (line.empty()) continue;
    if (line.starts_with("# HELP ") || line.starts_with("# TYPE ")) {
      const std::string_view rest = line.substr(7);
      const std::size_t sp = rest.find(' ');
      const std::string_view name = rest.substr(0, sp);
      if (!metric_name(name) || sp == std::string_view::npos) {
        bad.push_back("bad comment line: " + std::string(line));
        continue;
      }
      if (line[2] == 'T') {
        const std::string_view type = rest.substr(sp + 1);
        if (type != "counter" && type != "gauge" && type != "histogram" && type != "summary" && type != "untyped")
          bad.push_back("unknown type: " + std::string(line));
        if (type == "counter" && !name.ends_with("_total"))
          bad.push_back("counter not named *_total: " + std::string(name));
        if (!types.emplace(std::string(name), std::string(type)).second)
          bad.push_back("TYPE twice: " + std::string(name));
        families[std::string(name)];
      }
      continue;
    }
    if (line.starts_with("#")) continue;
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    const std::string name(line.substr(0, i));
    if (!metric_name(name)) {
      bad.push_back("bad metric name: " + std::string(line));
      continue;
    }
    std::string le;
    bool has_labels = false;
    if (i < line.size() && line[i] == '{') {
      has_labels = true;
      ++i;
      while (i < line.size() && line[i] != '}') {
        const std::size_t eq = line.find('=', i);
        if (eq == std::string_view::npos || eq + 1 >= line.size() || line[eq + 1] != '"') break;
        const std::string_view lname = line.substr(i, eq - i);
        std::string value;
        std::size_t j = eq + 2;
        for (; j < line.size() && line[j] != '"'; ++j) {
          if (line[j] == '\\' && j + 1 < line.size()) ++j;
          value += line[j];
        }
        if (!label_name(lname) || j >= line.size()) {
          i = line.size();
          break;
        }
        if (lname == "le") le = value;
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      if (i >= line.size()) {
        bad.push_back("bad labels: " + std::string(line));
        continue;
      }
      ++i;  // '}'
    }
    if (i >= line.size() || line[i] != ' ') {
      bad.push_back("no value: " + std::string(line));
      continue;
    }
    const auto v = prom_number(line.substr(i + 1));
    if (!v) {
      bad.push_back("bad value (or a timestamp): " + std::string(line));
      continue;
    }
    std::string family = name;
    if (!types.contains(family))
      for (const std::string_view suffix : {"_bucket", "_sum", "_count"})
        if (name.ends_with(suffix)) {
          const std::string base = name.substr(0, name.size() - suffix.size());
          if (const auto t = types.find(base); t != types.end() && t->second == "histogram") family = base;
        }
    const auto fam = families.find(family);
    if (!types.contains(family) || fam == families.end()) {
      bad.push_back("sample before its TYPE: " + name);
      continue;
    }
    if (name.ends_with("_bucket") && family != name && le.empty()) bad.push_back("bucket without le: " + name);
    fam->second.push_back({name, le, *v});
    if (!has_labels && !plain.emplace(name, *v).second) bad.push_back("sample twice: " + name);
  }

  for (const auto& [family, samples] : families) {
    const auto t = types.find(family);
    if (samples.empty()) bad.push_back("family without samples: " + family);
    if (t == types.end() || t->second != "histogram") continue;
    std::vector<prom_sample> buckets;
    for (const auto& x : samples)
      if (x.name == family + "_bucket") buckets.push_back(x);
    if (buckets.size() != latency_histogram::buckets + 1) {
      bad.push_back(family + ": " + std::to_string(buckets.size()) + " buckets");
      continue;
    }
    for (std::size_t b = 0; b < buckets.size(); ++b) {
      const auto le = prom_number(buckets[b].le);
      if (b + 1 == buckets.size()) {
        if (buckets[b].le != "+Inf") bad.push_back(family + ": last bucket le=\"" + buckets[b].le + "\"");
      } else if (const double want = latency_histogram::upper_seconds(b); !le || std::abs(*le - want) > 1e-9 * want) {
        bad.push_back(family + ": bucket " + std::to_string(b) + " le=\"" + buckets[b].le + "\" is not " +
                      std::to_string(latency_histogram::upper_seconds(b)) + " s");
      }
      if (b > 0 && buckets[b].value < buckets[b - 1].value)
        bad.push_back(family + ": bucket " + std::to_string(b) + " decreases");
      if (buckets[b].value < 0 || buckets[b].value != std::floor(buckets[b].value))
        bad.push_back(family + ": bucket " + std::to_string(b) + " is not a count");
    }
    const auto count = plain.find(family + "_count");
    const auto sum = plain.find(family + "_sum");
    if (count == plain.end() || sum == plain.end()) {
      bad.push_back(family + ": no _count or _sum");
      continue;
    }
    if (buckets.back().value != count->second)
      bad.push_back(family + ": +Inf bucket " + std::to_string(buckets.back().value) + " != _count " +
                    std::to_string(count->second));
    if (!(sum->second >= 0)) bad.push_back(family + ": negative _sum");
  }

  // The text says what the snapshot says.
  const auto expect = [&](const std::string& name, double v) {
    const auto it = plain.find(name);
    if (it == plain.end())
      bad.push_back("missing " + name);
    else if (it->second != v)
      bad.push_back(name + " = " + std::to_string(it->second) + ", snapshot has " + std::to_string(v));
  };
  const auto d = [](std::uint64_t v) { return static_cast<double>(v); };
  expect("kvortex_lookups_total", d(s.lookups));
  expect("kvortex_hit_chunks_total", d(s.hit_chunks));
  expect("kvortex_stored_chunks_total", d(s.stored_chunks));
  expect("kvortex_evictions_total", d(s.evictions));
  expect("kvortex_bytes", d(s.current_bytes));
  expect("kvortex_peak_bytes", d(s.peak_bytes));
  expect("kvortex_capacity_bytes", d(s.capacity_bytes));
  expect("kvortex_chunks", d(s.chunks));
  expect("kvortex_lookup_seconds_count", d(s.lookup_latency.count));
  expect("kvortex_store_seconds_count", d(s.store_latency.count));
  expect("kvortex_retrieve_seconds_count", d(s.retrieve_latency.count));
  return bad;
}

// Problems of one snapshot on its own (empty when there are none).
std::string snapshot_problem(const engine_stats& s, std::size_t capacity) {
  std::string bad;
  if (s.capacity_bytes != capacity) bad += " capacity_bytes " + std::to_string(s.capacity_bytes);
  if (s.current_bytes > capacity) bad += " current_bytes " + std::to_string(s.current_bytes) + " > capacity";
  if (s.peak_bytes > capacity) bad += " peak_bytes " + std::to_string(s.peak_bytes) + " > capacity";
  if (s.current_bytes > s.peak_bytes) bad += " current_bytes above peak_bytes";
  const auto hist = [&](const char* name, const latency_histogram& h) {
    const std::uint64_t sum = std::accumulate(h.counts.begin(), h.counts.end(), std::uint64_t{0});
    if (sum != h.count)
      bad += std::string(" ") + name + ": buckets sum to " + std::to_string(sum) + ", count " + std::to_string(h.count);
  };
  hist("lookup_latency", s.lookup_latency);
  hist("store_latency", s.store_latency);
  hist("retrieve_latency", s.retrieve_latency);
  return bad;
}

// ----------------------------------------------------------------------------------------------
// Policy stacks under test.

struct host_stack {  // the default stack; a layer's copy splits four ways, batches of two chunks
  using engine = host_engine;
  static constexpr bool mixed_sizes = true;
  static void tune(engine_config& c) {
    c.transfer_threads = 4;
    c.parallel_copy_bytes = 1024;
    c.transfer_batch_bytes = 4096;
  }
};

struct s3fifo_inline_stack {  // copies on the caller's thread; trailing partial chunks kept
  using engine = basic_engine<host_allocator, sha256_hasher, s3fifo_eviction, cpu_backend, inline_transfer_scheduler>;
  static constexpr bool mixed_sizes = true;
  static void tune(engine_config& c) { c.store_partial_chunks = true; }
};

struct partial_two_thread_stack {  // LRU, two copy threads, one batch per call, partial chunks
  using engine = basic_engine<host_allocator, sha256_hasher, lru_eviction, cpu_backend, host_transfer_scheduler>;
  static constexpr bool mixed_sizes = true;
  static void tune(engine_config& c) {
    c.store_partial_chunks = true;
    c.transfer_threads = 2;
    c.parallel_copy_bytes = 512;
    c.transfer_batch_bytes = 0;
  }
};

#ifdef KVORTEX_HAS_XXH3_HASHER
using pool_hasher = xxh3_hasher;
#else
using pool_hasher = sha256_hasher;
#endif
// The pool never gives a size class's space to another, so this stack writes one size only.
struct numa_pool_stack {
  using engine = basic_engine<numa_pool_allocator, pool_hasher, s3fifo_eviction, cpu_backend, host_transfer_scheduler>;
  static constexpr bool mixed_sizes = false;
  static void tune(engine_config& c) {
    c.transfer_threads = 3;
    c.parallel_copy_bytes = 2048;
    c.transfer_batch_bytes = 8192;
  }
};

}  // namespace

TYPE_TO_STRING(host_stack);
TYPE_TO_STRING(s3fifo_inline_stack);
TYPE_TO_STRING(partial_two_thread_stack);
TYPE_TO_STRING(numa_pool_stack);

namespace {

template <class Stack>
engine_config stress_config() {
  auto c = kvt::small_config(capacity_chunks);
  c.geometry.num_layers = 4;  // enough layers for the submission order to vary
  c.capacity_bytes = capacity_chunks * c.chunk_bytes();
  Stack::tune(c);
  return c;
}

// ----------------------------------------------------------------------------------------------
// The data: prompts sharing prefixes, the key API's own keys, and what every key must hold.

struct key_origin {
  int prompt;          // -1: one of the key API's own keys
  std::size_t first;   // first token of the chunk (token keys)
  std::size_t tokens;  // tokens in the chunk (token keys)
};

std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// The byte `i` of a key-API block of `size` bytes written under `k`.
std::byte key_byte(const chunk_key& k, std::size_t size, std::size_t i) {
  std::uint64_t h = 0;
  std::memcpy(&h, k.bytes.data() + 3, sizeof h);
  return static_cast<std::byte>(mix64(h ^ (size * 0x2545F4914F6CDD1DULL) ^ (i / 8)) >> (8 * (i % 8)));
}

struct model {
  engine_config cfg;
  std::size_t token_bytes, chunk_bytes, max_blocks;
  std::vector<std::vector<token_id>> prompts;
  std::vector<std::vector<chunk_key>> full_keys;     // [prompt][chunk]: keys of its full chunks
  std::vector<std::vector<chunk_key>> partial_keys;  // [prompt][n]: key of the trailing partial chunk of n tokens
  std::vector<chunk_key> pool;                       // the key API's own keys
  std::vector<std::size_t> sizes;                    // sizes the key API writes
  std::unordered_map<chunk_key, key_origin, chunk_key_hash> origin;  // every key a write can make
  std::unique_ptr<kvt::paged_cache> junk;  // wrong KV, read-only once built: source of stores that must never publish
  kv_layout junk_layout;

  // mixed_sizes: the key API also writes a partial chunk's size (16 tokens) and one that no
  // token count has, so keys get replaced by writes of another size.
  template <class Engine>
  model(const engine_config& c, const Engine& e, bool mixed_sizes)
      : cfg(c), token_bytes(c.geometry.token_bytes()), chunk_bytes(c.chunk_bytes()) {
    const std::size_t ct = cfg.chunk_tokens;
    for (std::size_t p = 0; p < prefixes; ++p) {
      const auto prefix = kvt::make_tokens(2 * ct, static_cast<std::uint32_t>(100 + p));
      for (std::size_t t = 0; t < tails; ++t) {
        auto toks = prefix;
        const auto tail = kvt::make_tokens(ct * (t % 4) + (t * 11) % ct, static_cast<std::uint32_t>(200 + t));
        toks.insert(toks.end(), tail.begin(), tail.end());
        prompts.push_back(std::move(toks));
      }
    }
    std::size_t longest = 0;
    for (std::size_t p = 0; p < prompts.size(); ++p) {
      const auto& toks = prompts[p];
      longest = std::max(longest, toks.size());
      auto keys = e.chunk_keys(toks).value();
      keys.resize(toks.size() / ct);
      for (std::size_t j = 0; j < keys.size(); ++j)
        origin.try_emplace(keys[j], key_origin{static_cast<int>(p), j * ct, ct});
      full_keys.push_back(std::move(keys));
      partial_keys.emplace_back(toks.size() + 1);
      if (!cfg.store_partial_chunks) continue;
      for (std::size_t n = 1; n <= toks.size(); ++n) {
        if (n % ct == 0) continue;
        const auto k = e.chunk_keys(std::span(toks).first(n)).value().back();
        partial_keys[p][n] = k;
        origin.try_emplace(k, key_origin{static_cast<int>(p), n - n % ct, n % ct});
      }
    }
    for (std::size_t i = 0; i < pool_keys; ++i) {
      chunk_key k;
      for (std::size_t w = 0; w < 4; ++w) {
        const std::uint64_t v = mix64(0xA11CE0000ULL + i * 4 + w);
        std::memcpy(k.bytes.data() + 8 * w, &v, sizeof v);
      }
      pool.push_back(k);
      origin.try_emplace(k, key_origin{-1, i, 0});
    }
    sizes = {chunk_bytes};
    if (mixed_sizes) sizes = {chunk_bytes, chunk_bytes / 2, chunk_bytes / 4 + 192};
    max_blocks = (longest + cfg.block_tokens - 1) / cfg.block_tokens + 3;
    junk = std::make_unique<kvt::paged_cache>(cfg.geometry, max_blocks, cfg.block_tokens);
    for (auto& l : junk->layers) std::memset(l.data(), 0xEE, l.size());
    junk_layout = junk->layout();
  }

  [[nodiscard]] std::span<const token_id> tokens(std::size_t p, std::size_t n) const {
    return std::span(prompts[p]).first(n);
  }
  // Chunks a prompt of n tokens is cut into, and chunks holding t tokens of it.
  [[nodiscard]] std::size_t chunk_count(std::size_t n) const {
    return n / cfg.chunk_tokens + (cfg.store_partial_chunks && n % cfg.chunk_tokens != 0 ? 1 : 0);
  }
  [[nodiscard]] std::size_t chunks_of(std::size_t t) const { return (t + cfg.chunk_tokens - 1) / cfg.chunk_tokens; }

  // What `size` bytes under `k` must be: the prompt's KV in chunk order ([layer][plane][token][row])
  // for a token key at its own size, else the key API's bytes.
  void expected(const chunk_key& k, std::size_t size, std::span<std::byte> out) const {
    const auto it = origin.find(k);
    if (it != origin.end() && it->second.prompt >= 0 && size == it->second.tokens * token_bytes) {
      const auto& o = it->second;
      const auto& toks = prompts[static_cast<std::size_t>(o.prompt)];
      const auto& g = cfg.geometry;
      const std::size_t row = g.row_bytes();
      std::size_t at = 0;
      for (std::size_t l = 0; l < g.num_layers; ++l)
        for (std::size_t pl = 0; pl < g.kv_planes; ++pl)
          for (std::size_t t = 0; t < o.tokens; ++t)
            for (std::size_t i = 0; i < row; ++i) out[at++] = kvt::kv_byte(toks[o.first + t], o.first + t, l, pl, i);
      return;
    }
    for (std::size_t i = 0; i < size; ++i) out[i] = key_byte(k, size, i);
  }
  [[nodiscard]] std::size_t token_size(const chunk_key& k) const {
    const auto it = origin.find(k);
    return it == origin.end() || it->second.prompt < 0 ? 0 : it->second.tokens * token_bytes;
  }
};

// ----------------------------------------------------------------------------------------------
// What the threads did, summed at the end and compared with the engine's counters.

enum op_kind : std::size_t {
  op_lookup,
  op_store,
  op_retrieve,
  op_layered_store,
  op_layered_retrieve,
  op_save,
  op_load,
  op_check,
  op_chunk_keys,
  op_stats,
  op_invalid,
  op_kinds
};
constexpr std::array<unsigned, op_kinds> op_weights = {14, 10, 10, 12, 12, 9, 9, 5, 3, 3, 3};
constexpr std::array<const char*, op_kinds> op_names = {"lookup", "store", "retrieve", "layered store",
                                                        "layered retrieve", "save_blocks", "load_blocks",
                                                        "check_blocks", "chunk_keys", "stats", "invalid call"};

struct tally {
  std::uint64_t lookups{0}, queried_tokens{0}, hit_tokens{0}, hit_chunks{0}, miss_chunks{0};
  std::uint64_t stored_chunks{0}, bytes_stored{0}, retrieved_chunks{0}, bytes_loaded{0};
  std::uint64_t stores_begun{0}, retrieves_begun{0};  // one store / retrieve latency sample each
  std::uint64_t retrieve_hits{0}, transfer_failures{0};
  std::array<std::uint64_t, op_kinds> ops{};

  tally& operator+=(const tally& o) {
    lookups += o.lookups;
    queried_tokens += o.queried_tokens;
    hit_tokens += o.hit_tokens;
    hit_chunks += o.hit_chunks;
    miss_chunks += o.miss_chunks;
    stored_chunks += o.stored_chunks;
    bytes_stored += o.bytes_stored;
    retrieved_chunks += o.retrieved_chunks;
    bytes_loaded += o.bytes_loaded;
    stores_begun += o.stores_begun;
    retrieves_begun += o.retrieves_begun;
    retrieve_hits += o.retrieve_hits;
    transfer_failures += o.transfer_failures;
    for (std::size_t i = 0; i < op_kinds; ++i) ops[i] += o.ops[i];
    return *this;
  }
};

// ----------------------------------------------------------------------------------------------
// One thread's calls. In shutdown mode an error shut_down is always acceptable, every call begun
// after shutdown() returned must fail with it, and the thread parks an open layered transfer and
// an unwaited ticket to use after the engine is gone.

template <class Engine>
class worker {
 public:
  using layered = typename Engine::layered_transfer;

  worker(Engine& e, const model& m, problem_log& log, std::uint64_t seed, const std::atomic<bool>* shut = nullptr)
      : e_(e), m_(m), log_(log), rng_(seed), shut_(shut), layers_(m.cfg.geometry.num_layers) {}

  tally counts;
  std::atomic<std::size_t> post_shutdown_calls{0};

  void run_one() {
    must_fail_ = shut_ != nullptr && shut_->load(std::memory_order_acquire);
    if (shut_ != nullptr) tend_parked();
    std::size_t kind = pick_kind();
    if (kind == op_invalid && shut_ != nullptr) kind = op_lookup;  // which error wins is not specified
    ++counts.ops[kind];
    switch (kind) {
      case op_lookup: do_lookup(); break;
      case op_store: do_store(); break;
      case op_retrieve: do_retrieve(); break;
      case op_layered_store: do_layered(true); break;
      case op_layered_retrieve: do_layered(false); break;
      case op_save: do_save(); break;
      case op_load: do_load(); break;
      case op_check: do_check(); break;
      case op_chunk_keys: do_chunk_keys(); break;
      case op_stats: do_stats(); break;
      default: do_invalid(); break;
    }
    if (must_fail_) post_shutdown_calls.fetch_add(1, std::memory_order_relaxed);
  }

  // After the engine is destroyed: what this thread still holds must fail cleanly or be complete.
  void after_engine_gone() {
    must_fail_ = true;
    if (parked_) {
      auto& op = *parked_;
      for (std::size_t l = 0; l < layers_; ++l)
        if (!parked_sent_[l]) {
          const auto r = op.submit_layer(l);
          expect_shut_down(r, "submit_layer of a transfer open across shutdown");
          break;
        }
      auto f = op.finish();
      expect_shut_down(f, "finish of a transfer open across shutdown");
      if (f && !f->ready()) problem("finish after shutdown gave a ticket that is not ready");
      parked_.reset();
    }
    if (kept_) {
      if (!kept_->ticket.ready())
        problem("a ticket of submitted copies is not ready after shutdown()");
      else
        settle(*kept_);
      kept_.reset();
    }
  }

 private:
  struct request {
    std::size_t prompt, n;
  };
  // A finished store or retrieve whose ticket is not waited for yet, with the cache it uses.
  struct pending {
    transfer_ticket ticket;
    std::unique_ptr<kvt::paged_cache> cache;
    std::vector<std::int32_t> table;
    request req;
    bool retrieve;
  };

  void problem(const std::string& what) { log_.add(what); }

  std::size_t pick_kind() {
    static constexpr unsigned total = std::accumulate(op_weights.begin(), op_weights.end(), 0u);
    unsigned r = static_cast<unsigned>(rng_() % total);
    for (std::size_t k = 0; k < op_kinds; ++k) {
      if (r < op_weights[k]) return k;
      r -= op_weights[k];
    }
    return op_lookup;
  }

  // Checks one call's outcome; true when it succeeded.
  template <class T>
  bool ok(const result<T>& r, std::string_view call, std::initializer_list<errc> allowed = {}) {
    if (r) {
      if (must_fail_) problem(std::string(call) + " succeeded after shutdown() returned");
      return true;
    }
    const errc c = r.error().code;
    if (c == errc::shut_down) {
      if (shut_ == nullptr) problem(std::string(call) + ": " + r.error().what() + " (no shutdown was asked)");
      return false;
    }
    if (must_fail_)
      problem(std::string(call) + " after shutdown() returned: " + r.error().what() + ", not shut_down");
    else if (std::find(allowed.begin(), allowed.end(), c) == allowed.end())
      problem(std::string(call) + ": " + r.error().what());
    return false;
  }
  template <class T>
  void expect_shut_down(const result<T>& r, std::string_view call) {
    if (r)
      problem(std::string(call) + " succeeded; expected shut_down");
    else if (r.error().code != errc::shut_down)
      problem(std::string(call) + ": " + r.error().what() + "; expected shut_down");
  }
  template <class T>
  void expect_error(const result<T>& r, errc want, std::string_view call) {
    if (!r && r.error().code == errc::shut_down && shut_ != nullptr) return;  // raced the shutdown
    if (r)
      problem(std::string(call) + " was accepted; expected " + std::string(to_string(want)));
    else if (r.error().code != want)
      problem(std::string(call) + ": " + r.error().what() + "; expected " + std::string(to_string(want)));
  }

  request pick_request() {
    const std::size_t p = rng_() % m_.prompts.size();
    const std::size_t len = m_.prompts[p].size();
    return {p, rng_() % 2 ? len : 1 + rng_() % len};
  }
  std::span<const token_id> toks(const request& r) const { return m_.tokens(r.prompt, r.n); }

  // A cache holding the request's KV (fill) or the sentinel, at a random block table.
  std::unique_ptr<kvt::paged_cache> make_cache(const request& r, bool fill, std::vector<std::int32_t>& table) {
    const std::size_t bt = m_.cfg.block_tokens;
    const std::size_t need = (r.n + bt - 1) / bt;
    const std::size_t blocks = need + 1 + rng_() % 3;
    const auto order = rng_() % 2 ? kv_order::nhd : kv_order::hnd;
    auto c = std::make_unique<kvt::paged_cache>(m_.cfg.geometry, blocks, bt, order);
    table = kvt::random_table(need, blocks, static_cast<std::uint32_t>(rng_()));
    if (fill)
      c->fill(toks(r), table);
    else
      for (auto& l : c->layers) std::memset(l.data(), static_cast<int>(sentinel), l.size());
    return c;
  }

  // A retrieve that yielded `got` tokens: those are the model's KV, the rest still the sentinel.
  void verify_retrieved(kvt::paged_cache& c, const request& r, std::size_t got, std::span<const std::int32_t> table,
                        std::string_view call) {
    if (got > r.n || (got % m_.cfg.chunk_tokens != 0 && got != r.n)) {
      problem(std::string(call) + " yielded " + std::to_string(got) + " of " + std::to_string(r.n) + " tokens");
      return;
    }
    const auto t = toks(r);
    if (const auto bad = c.mismatches(t, got, table); bad != 0)
      problem(std::string(call) + ": " + std::to_string(bad) + " wrong bytes in " + std::to_string(got) + " tokens");
    std::size_t stray = 0;
    for (std::size_t pos = got; pos < r.n; ++pos)
      c.for_each_byte(pos, table,
                      [&](std::size_t, std::size_t, std::size_t, std::byte* b) { stray += *b != sentinel; });
    if (stray != 0)
      problem(std::string(call) + ": " + std::to_string(stray) + " bytes written past the tokens it yielded");
  }
  bool untouched(const kvt::paged_cache& c) const {
    for (const auto& l : c.layers)
      if (std::any_of(l.begin(), l.end(), [](std::byte b) { return b != sentinel; })) return false;
    return true;
  }

  void count_retrieve_begun(const request& r, std::size_t hit) {
    ++counts.retrieves_begun;
    counts.hit_chunks += m_.chunks_of(hit);
    counts.miss_chunks += m_.chunk_count(r.n) - m_.chunks_of(hit);
  }
  void count_retrieved(std::size_t got) {
    counts.retrieved_chunks += m_.chunks_of(got);
    counts.bytes_loaded += got * m_.token_bytes;
    counts.retrieve_hits += got;
  }
  void count_stored(std::size_t written) {
    counts.stored_chunks += m_.chunks_of(written);
    counts.bytes_stored += written * m_.token_bytes;
  }

  // A pending ticket's end: a store wrote at most its tokens, a retrieve's bytes are right. The
  // ticket may come from before a shutdown, so success is fine whenever it is waited for.
  void settle(pending& p) {
    const auto v = p.ticket.wait();
    const char* what = p.retrieve ? "retrieve ticket" : "store ticket";
    if (!v) {
      if (v.error().code != errc::shut_down || shut_ == nullptr) problem(std::string(what) + ": " + v.error().what());
      return;
    }
    if (p.retrieve) {
      verify_retrieved(*p.cache, p.req, *v, p.table, what);
      count_retrieved(*v);
    } else {
      if (*v > p.req.n) problem("store ticket yielded more tokens than the prompt has");
      count_stored(*v);
    }
  }
  // Waits for the ticket now, or (shutdown mode, sometimes) keeps it for later.
  void finish_pending(pending p) {
    if (shut_ != nullptr && rng_() % 4 == 0) {
      if (kept_) settle(*kept_);
      kept_.emplace(std::move(p));
      return;
    }
    settle(p);
  }

  void do_lookup() {
    const auto r = pick_request();
    const auto h = e_.lookup(toks(r));
    if (!ok(h, "lookup")) return;
    if (*h > r.n || (*h % m_.cfg.chunk_tokens != 0 && *h != r.n))
      problem("lookup of " + std::to_string(r.n) + " tokens found " + std::to_string(*h));
    ++counts.lookups;
    counts.queried_tokens += r.n;
    counts.hit_tokens += *h;
    counts.hit_chunks += m_.chunks_of(*h);
    counts.miss_chunks += m_.chunk_count(r.n) - m_.chunks_of(*h);
  }

  void do_store() {
    const auto r = pick_request();
    pending p{{}, nullptr, {}, r, false};
    p.cache = make_cache(r, true, p.table);
    auto t = e_.store(toks(r), p.cache->layout(), p.table);
    if (!ok(t, "store")) {
      graveyard_.push_back(std::move(p.cache));  // shut down mid-call: copies may have been submitted
      return;
    }
    ++counts.stores_begun;
    p.ticket = *t;
    finish_pending(std::move(p));
  }

  void do_retrieve() {
    const auto r = pick_request();
    pending p{{}, nullptr, {}, r, true};
    p.cache = make_cache(r, false, p.table);
    auto t = e_.retrieve(toks(r), p.cache->layout(), p.table);
    if (!ok(t, "retrieve")) {
      graveyard_.push_back(std::move(p.cache));
      return;
    }
    // retrieve() counts its hits when it starts; without the layered handle only the ticket says
    // how many, which is the same number when the ticket succeeds (always, without a shutdown).
    p.ticket = *t;
    if (shut_ == nullptr) {
      settle(p);
      count_retrieve_begun(r, p.ticket.wait().value_or(0));
      return;
    }
    finish_pending(std::move(p));
  }

  enum class ending { finish_all, drop_early, drop_partial, finish_missing };

  ending pick_ending(bool storing) {
    const auto x = rng_() % 20;
    ending how = x < 12   ? ending::finish_all
                 : x < 14 ? ending::drop_early
                 : x < 17 ? ending::drop_partial
                          : ending::finish_missing;
    // A retrieve that ends without a ticket may still be copying into its cache: the cache is
    // kept until the case ends, so only so many.
    const bool ticketless = how == ending::drop_partial || how == ending::finish_missing;
    if (!storing && ticketless && graveyard_.size() >= graveyard_cap) how = ending::finish_all;
    return how;
  }

  std::vector<std::size_t> layer_order() {
    std::vector<std::size_t> order(layers_);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::shuffle(order.begin(), order.end(), rng_);
    return order;
  }

  // begin_store / begin_retrieve, layers in random order, then one of the endings.
  void do_layered(bool storing) {
    const auto r = pick_request();
    const ending how = pick_ending(storing);
    const bool junk_source = storing && how != ending::finish_all && how != ending::drop_early;
    std::vector<std::int32_t> table;
    std::unique_ptr<kvt::paged_cache> cache;
    kv_layout lay;
    if (junk_source) {  // rolled back, so its bytes must never be seen; read-only, so shared
      table = kvt::random_table((r.n + m_.cfg.block_tokens - 1) / m_.cfg.block_tokens, m_.max_blocks,
                                static_cast<std::uint32_t>(rng_()));
      lay = m_.junk_layout;
    } else {
      cache = make_cache(r, storing, table);
      lay = cache->layout();
    }
    const char* what = storing ? "begin_store" : "begin_retrieve";
    auto op = storing ? e_.begin_store(toks(r), lay, table) : e_.begin_retrieve(toks(r), lay, table);
    if (!ok(op, what)) return;
    const std::size_t held = op->tokens();
    if (storing) {
      ++counts.stores_begun;
      if (held > r.n) problem("begin_store holds more tokens than the prompt has");
    } else {
      count_retrieve_begun(r, held);
    }
    const auto order = layer_order();
    std::size_t submit = how == ending::finish_all ? layers_
                         : how == ending::drop_early ? 0
                                                     : rng_() % layers_;  // fewer than all
    if (how == ending::drop_partial && submit == 0) submit = 1;
    bool failed = false;
    for (std::size_t i = 0; i < submit && !failed; ++i) {
      failed = !ok(op->submit_layer(order[i]), "submit_layer");
      if (rng_() % 4 == 0) std::this_thread::yield();  // let others evict around the pinned chunks
    }
    // Dropped, or finished with a layer missing: the engine counts a failed transfer.
    if (held > 0 && how != ending::finish_all) ++counts.transfer_failures;
    if (failed || how == ending::drop_early || how == ending::drop_partial) {
      const bool copies_may_run = submit > 0 || failed;
      op = std::unexpected(error{});  // drops the transfer
      if (!storing && how == ending::drop_early && !failed && cache && !untouched(*cache))
        problem("a retrieve dropped before any layer was submitted wrote into its cache");
      if (cache && copies_may_run) graveyard_.push_back(std::move(cache));
      return;
    }
    auto t = op->finish();
    if (how == ending::finish_missing) {
      if (held > 0)
        expect_error(t, errc::invalid_argument, storing ? "finish of a store with a layer never submitted"
                                                        : "finish of a retrieve with a layer never submitted");
      else if (!t)
        (void)ok(t, "finish of a transfer holding nothing");
      if (!t) {  // no ticket: copies already submitted may still run
        if (cache && submit > 0) graveyard_.push_back(std::move(cache));
        return;
      }
      // Accepted (wrongly, when it held chunks): count what the engine counts.
      if (const auto v = t->wait(); v && storing)
        count_stored(*v);
      else if (v)
        count_retrieved(*v);
      return;
    }
    if (!ok(t, "finish")) {
      if (cache) graveyard_.push_back(std::move(cache));
      return;
    }
    pending p{*t, std::move(cache), std::move(table), r, !storing};
    const auto v = p.ticket.wait();
    if (ok(v, storing ? "layered store ticket" : "layered retrieve ticket") && *v != held)
      problem(std::string(what) + " held " + std::to_string(held) + " tokens, its ticket yielded " +
              std::to_string(*v));
    if (v) {
      if (storing)
        count_stored(*v);
      else if (!must_fail_) {
        verify_retrieved(*p.cache, r, *v, p.table, "layered retrieve");
        count_retrieved(*v);
      }
    }
  }

  // A write of 1-3 keys, one size per call: the key API's own keys, chunks of a prompt with the
  // prompt's KV (as a lower tier would write them back), or one prompt chunk at another size.
  void do_save() {
    std::vector<chunk_key> keys;
    std::size_t size = m_.chunk_bytes;
    const auto kind = rng_() % 20;
    if (kind < 10) {
      size = m_.sizes[rng_() % m_.sizes.size()];
      const std::size_t first = rng_() % m_.pool.size();
      for (std::size_t i = 0, n = 1 + rng_() % 3; i < n; ++i) keys.push_back(m_.pool[(first + i * 7) % m_.pool.size()]);
    } else {
      const auto& full = m_.full_keys[rng_() % m_.full_keys.size()];
      const std::size_t j = rng_() % full.size();
      if (kind < 17 || m_.sizes.size() == 1) {
        const std::size_t n = std::min(full.size() - j, 1 + rng_() % 3);
        keys.insert(keys.end(), full.begin() + static_cast<std::ptrdiff_t>(j),
                    full.begin() + static_cast<std::ptrdiff_t>(j + n));
      } else {
        keys.push_back(full[j]);
        size = m_.sizes[1 + rng_() % (m_.sizes.size() - 1)];  // never the chunk's own size
      }
    }
    std::vector<std::vector<std::byte>> bufs(keys.size(), std::vector<std::byte>(size));
    std::vector<const std::byte*> ptrs;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      m_.expected(keys[i], size, bufs[i]);
      ptrs.push_back(bufs[i].data());
    }
    const std::vector<std::size_t> sizes(keys.size(), size);
    const auto n = e_.save_blocks(keys, ptrs, sizes);
    if (!ok(n, "save_blocks")) return;
    if (*n > keys.size()) problem("save_blocks stored more keys than it was given");
    ++counts.stores_begun;
    counts.stored_chunks += *n;
    counts.bytes_stored += *n * size;
  }

  // A read of 1-3 keys at guessed sizes into separate buffers: all right, or nothing touched.
  void do_load() {
    std::vector<chunk_key> keys;
    std::vector<std::size_t> sizes;
    for (std::size_t i = 0, n = 1 + rng_() % 3; i < n; ++i) {
      if (rng_() % 2) {
        keys.push_back(m_.pool[rng_() % m_.pool.size()]);
        sizes.push_back(m_.sizes[rng_() % m_.sizes.size()]);
      } else {
        const auto& full = m_.full_keys[rng_() % m_.full_keys.size()];
        keys.push_back(full[rng_() % full.size()]);
        sizes.push_back(m_.chunk_bytes);
      }
    }
    std::vector<std::vector<std::byte>> bufs;
    std::vector<std::byte*> ptrs;
    for (const auto s : sizes) bufs.emplace_back(s, sentinel);
    for (auto& b : bufs) ptrs.push_back(b.data());
    const auto r = e_.load_blocks(keys, ptrs, sizes);
    if (!ok(r, "load_blocks", {errc::not_found, errc::size_mismatch})) {
      for (const auto& b : bufs)
        if (std::any_of(b.begin(), b.end(), [](std::byte x) { return x != sentinel; })) {
          problem("a failed load_blocks wrote into a destination");
          break;
        }
      return;
    }
    std::vector<std::byte> want;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      want.resize(sizes[i]);
      m_.expected(keys[i], sizes[i], want);
      if (want != bufs[i]) problem("load_blocks: wrong bytes for a key of " + std::to_string(sizes[i]) + " bytes");
      counts.bytes_loaded += sizes[i];
    }
    counts.hit_chunks += keys.size();
    counts.retrieved_chunks += keys.size();
  }

  void do_check() {
    std::vector<chunk_key> keys;
    for (std::size_t i = 0, n = 1 + rng_() % 8; i < n; ++i) {
      if (rng_() % 2) {
        keys.push_back(m_.pool[rng_() % m_.pool.size()]);
      } else {
        const auto& full = m_.full_keys[rng_() % m_.full_keys.size()];
        keys.push_back(full[rng_() % full.size()]);
      }
    }
    const auto mask = e_.check_blocks(keys);
    if (ok(mask, "check_blocks") && mask->size() != keys.size()) problem("check_blocks: mask of the wrong size");
  }

  void do_chunk_keys() {
    const auto r = pick_request();
    const auto keys = e_.chunk_keys(toks(r));
    if (!ok(keys, "chunk_keys")) return;
    const std::size_t ct = m_.cfg.chunk_tokens;
    const auto& full = m_.full_keys[r.prompt];
    std::vector<chunk_key> want(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(r.n / ct));
    if (m_.cfg.store_partial_chunks && r.n % ct != 0) want.push_back(m_.partial_keys[r.prompt][r.n]);
    if (*keys != want) problem("chunk_keys differs from the keys computed at setup");
  }

  void do_stats() {
    const auto s = e_.stats();
    if (const auto bad = snapshot_problem(s, m_.cfg.capacity_bytes); !bad.empty()) problem("stats():" + bad);
    if (const auto bad = prometheus_problems(to_prometheus(s), s); !bad.empty())
      problem("to_prometheus: " + bad.front());
  }

  // Calls the engine must reject without changing a counter.
  void do_invalid() {
    const auto x = rng_() % 4;
    if (x == 0) {  // a block table naming one physical block twice
      request r{rng_() % m_.prompts.size(), 0};
      r.n = m_.prompts[r.prompt].size();
      std::vector<std::int32_t> table;
      auto cache = make_cache(r, false, table);
      table[1] = table[0];
      auto t = e_.retrieve(toks(r), cache->layout(), table);
      expect_error(t, errc::invalid_argument, "retrieve into a block table with a repeated block");
      if (t) (void)t->wait();
    } else if (x == 1) {  // layers sharing memory
      request r{rng_() % m_.prompts.size(), 0};
      r.n = m_.prompts[r.prompt].size();
      std::vector<std::int32_t> table;
      auto cache = make_cache(r, false, table);
      auto ptrs = cache->ptrs;
      ptrs[1] = ptrs[0];
      auto lay = kv_layout::flash_attn(ptrs, m_.cfg.geometry, cache->num_blocks, cache->block_tokens, cache->order);
      if (!lay) {
        expect_error(lay, errc::invalid_layout, "flash_attn layout with aliased layers");
        return;
      }
      auto t = e_.retrieve(toks(r), *lay, table);
      expect_error(t, errc::invalid_layout, "retrieve into layers sharing memory");
      if (t) (void)t->wait();
    } else if (x == 2) {  // overlapping destinations
      const std::size_t size = m_.sizes[rng_() % m_.sizes.size()];
      std::vector<std::byte> buf(size + size / 2);
      const std::array<chunk_key, 2> keys = {m_.pool[rng_() % m_.pool.size()], m_.pool[rng_() % m_.pool.size()]};
      const std::array<std::byte*, 2> ptrs = {buf.data(), buf.data() + size / 2};
      const std::array<std::size_t, 2> sizes = {size, size};
      expect_error(e_.load_blocks(keys, ptrs, sizes), errc::invalid_argument, "load_blocks into overlapping ranges");
    } else {  // a null destination
      const std::array<chunk_key, 1> keys = {m_.pool[rng_() % m_.pool.size()]};
      const std::array<std::byte*, 1> ptrs = {nullptr};
      const std::array<std::size_t, 1> sizes = {m_.chunk_bytes};
      expect_error(e_.load_blocks(keys, ptrs, sizes), errc::invalid_argument, "load_blocks into a null pointer");
    }
  }

  // Shutdown mode: sometimes open a layered transfer and keep it across calls, sometimes end it.
  void tend_parked() {
    if (rng_() % 8 != 0) return;
    if (!parked_) {
      const auto r = pick_request();
      const bool storing = rng_() % 2;
      std::vector<std::int32_t> table;
      auto cache = make_cache(r, storing, table);
      const auto lay = cache->layout();
      auto op = storing ? e_.begin_store(toks(r), lay, table) : e_.begin_retrieve(toks(r), lay, table);
      if (!ok(op, "begin a parked transfer")) return;
      parked_.emplace(std::move(*op));
      parked_sent_.assign(layers_, false);
      const auto order = layer_order();
      for (std::size_t i = 0, n = rng_() % layers_; i < n; ++i) {
        if (!ok(parked_->submit_layer(order[i]), "submit_layer of a parked transfer")) break;
        parked_sent_[order[i]] = true;
      }
      parked_cache_ = std::move(cache);
      return;
    }
    if (must_fail_) return;  // kept for after_engine_gone
    bool ended = false;
    for (std::size_t l = 0; l < layers_ && !ended; ++l)
      if (!parked_sent_[l]) {
        ended = !ok(parked_->submit_layer(l), "submit_layer of a parked transfer");
        parked_sent_[l] = true;
      }
    if (!ended && rng_() % 2) {
      auto t = parked_->finish();
      if (ok(t, "finish of a parked transfer")) {
        (void)ok(t->wait(), "parked transfer ticket");
        parked_.reset();
        parked_cache_.reset();
        return;
      }
    }
    parked_.reset();
    graveyard_.push_back(std::move(parked_cache_));
  }

  Engine& e_;
  const model& m_;
  problem_log& log_;
  std::mt19937_64 rng_;
  const std::atomic<bool>* shut_;
  const std::size_t layers_;
  bool must_fail_{false};
  std::vector<std::unique_ptr<kvt::paged_cache>> graveyard_;
  std::unique_ptr<kvt::paged_cache> parked_cache_;  // before parked_: outlives it
  std::optional<layered> parked_;
  std::vector<bool> parked_sent_;
  std::optional<pending> kept_;
};

std::string op_summary(const tally& t, double secs) {
  std::string s;
  std::uint64_t all = 0;
  for (std::size_t k = 0; k < op_kinds; ++k) {
    s += std::string(op_names[k]) + " " + std::to_string(t.ops[k]) + ", ";
    all += t.ops[k];
  }
  char rate[64];
  std::snprintf(rate, sizeof rate, "%.0f calls/s", static_cast<double>(all) / secs);
  return s + rate;
}

// Waits until every transfer the threads began has been finalized (each records one latency
// sample, dropped ones included, possibly on a copy thread after the caller moved on).
template <class Engine>
engine_stats quiescent_stats(const Engine& e, const tally& t) {
  const auto deadline = steady::now() + std::chrono::seconds(30);
  for (;;) {
    const auto s = e.stats();
    const bool done = s.store_latency.count >= t.stores_begun && s.retrieve_latency.count >= t.retrieves_begun;
    if (done || steady::now() > deadline) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

// No ';' in these names: CMake would split the ctest entry in two that match no test case.
TEST_CASE_TEMPLATE("8 threads mix every call on a small capacity: bytes, capacity and counters hold", Stack,
                   host_stack, s3fifo_inline_stack, partial_two_thread_stack, numa_pool_stack) {
  using Engine = typename Stack::engine;
  const auto cfg = stress_config<Stack>();
  const double secs = stress_seconds();
  watchdog wd(seconds_f(4 * secs + 120), "the stress case");
  auto e = Engine::create(cfg).value();
  const model m(cfg, e, Stack::mixed_sizes);
  problem_log log;

  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> samples{0};
  std::thread monitor([&] {
    engine_stats prev;
    while (!stop.load(std::memory_order_acquire)) {
      const auto s = e.stats();
      const auto n = samples.fetch_add(1, std::memory_order_relaxed);
      if (const auto bad = snapshot_problem(s, cfg.capacity_bytes); !bad.empty()) log.add("monitor:" + bad);
      if (s.peak_bytes < prev.peak_bytes || s.lookups < prev.lookups || s.stored_chunks < prev.stored_chunks ||
          s.evictions < prev.evictions || s.hit_chunks < prev.hit_chunks ||
          s.lookup_latency.count < prev.lookup_latency.count)
        log.add("monitor: a counter went down between two snapshots");
      if (n % 4 == 0)
        if (const auto bad = prometheus_problems(to_prometheus(s), s); !bad.empty())
          log.add("monitor: to_prometheus: " + bad.front());
      prev = s;
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  });

  std::vector<std::unique_ptr<worker<Engine>>> workers;
  for (unsigned t = 0; t < worker_threads; ++t)
    workers.push_back(std::make_unique<worker<Engine>>(e, m, log, 1000 + t));
  const auto t0 = steady::now();
  const auto deadline = t0 + std::chrono::duration_cast<steady::duration>(seconds_f(secs));
  std::vector<std::thread> pool;
  for (auto& w : workers)
    pool.emplace_back([&, w = w.get()] {
      while (steady::now() < deadline) w->run_one();
    });
  for (auto& t : pool) t.join();
  stop.store(true, std::memory_order_release);
  monitor.join();
  const double ran = seconds_f(steady::now() - t0).count();

  tally all;
  for (const auto& w : workers) all += w->counts;
  const auto s = quiescent_stats(e, all);
  MESSAGE(doctest::toString<Stack>() << ": " << op_summary(all, ran) << "; " << samples.load() << " snapshots; "
                                     << s.evictions << " evictions, " << s.replaced_chunks << " replaced, "
                                     << s.rejected_chunks << " rejected, " << s.deduplicated_chunks
                                     << " deduplicated chunks");
  CHECK_MESSAGE(log.count() == 0, log.summary());
  CHECK(samples.load() > 10);
  for (std::size_t k = 0; k < op_kinds; ++k) CHECK_MESSAGE(all.ops[k] > 0, op_names[k]);

  // Counters equal what the threads did; no rejected call and no check_blocks moved one.
  CHECK(snapshot_problem(s, cfg.capacity_bytes).empty());
  CHECK(prometheus_problems(to_prometheus(s), s).empty());
  CHECK(s.store_latency.count == all.stores_begun);
  CHECK(s.retrieve_latency.count == all.retrieves_begun);
  CHECK(s.lookups == all.lookups);
  CHECK(s.lookup_latency.count == all.lookups);
  CHECK(s.queried_tokens == all.queried_tokens);
  CHECK(s.hit_tokens == all.hit_tokens);
  CHECK(s.hit_chunks == all.hit_chunks);
  CHECK(s.miss_chunks == all.miss_chunks);
  CHECK(s.stored_chunks == all.stored_chunks);
  CHECK(s.bytes_stored == all.bytes_stored);
  CHECK(s.retrieved_chunks == all.retrieved_chunks);
  CHECK(s.bytes_loaded == all.bytes_loaded);
  CHECK(s.peak_bytes <= cfg.capacity_bytes);
  // Every chunk written is held, evicted or replaced.
  CHECK(s.chunks + s.evictions + s.replaced_chunks == s.stored_chunks);
  CHECK(s.transfer_failures == all.transfer_failures);
  CHECK(s.evictions > 0);
  if (Stack::mixed_sizes) CHECK(s.replaced_chunks > 0);
  CHECK(all.retrieve_hits > 0);
  CHECK(e.get_allocator().bytes_reserved() == s.current_bytes);

  // Every held chunk comes from a write of the test and loads, at exactly one size, with the bytes
  // it was written with; those sizes add up to current_bytes.
  std::vector<chunk_key> every;
  for (const auto& [k, o] : m.origin) every.push_back(k);
  const auto mask = e.check_blocks(every).value();
  CHECK(mask.count() == s.chunks);
  std::uint64_t held_bytes = 0;
  std::size_t wrong = 0, unreadable = 0;
  std::vector<std::byte> buf, want;
  for (std::size_t i = 0; i < every.size(); ++i) {
    if (!mask.test(i)) continue;
    std::vector<std::size_t> candidates = m.sizes;
    const auto ts = m.token_size(every[i]);
    if (ts != 0 && std::find(candidates.begin(), candidates.end(), ts) == candidates.end()) candidates.push_back(ts);
    std::size_t loads = 0;
    for (const auto size : candidates) {
      buf.assign(size, sentinel);
      std::byte* p = buf.data();
      if (!e.load_blocks(std::span(&every[i], 1), std::span(&p, 1), std::span(&size, 1))) continue;
      ++loads;
      held_bytes += size;
      want.resize(size);
      m.expected(every[i], size, want);
      wrong += want != buf;
    }
    unreadable += loads != 1;
  }
  CHECK(wrong == 0);
  CHECK(unreadable == 0);
  CHECK(held_bytes == s.current_bytes);

  // lookup agrees with what is held: its hit is held, the chunk after it is not usable.
  std::size_t disagreements = 0;
  for (std::size_t p = 0; p < m.prompts.size(); ++p) {
    const auto& toks = m.prompts[p];
    const std::size_t hit = e.lookup(toks).value();
    const auto keys = e.chunk_keys(toks).value();
    const auto held = e.check_blocks(keys).value();
    for (std::size_t c = 0; c < m.chunks_of(hit); ++c) disagreements += !held.test(c);
    if (m.chunks_of(hit) < keys.size()) {
      const chunk_key next = keys[m.chunks_of(hit)];
      const std::size_t size = m.token_size(next);
      buf.assign(size, sentinel);
      std::byte* ptr = buf.data();
      disagreements += e.load_blocks(std::span(&next, 1), std::span(&ptr, 1), std::span(&size, 1)).has_value();
    }
  }
  CHECK(disagreements == 0);

  e.shutdown();
  CHECK(e.stats().current_bytes == 0);
  CHECK(e.stats().chunks == 0);
  CHECK(e.get_allocator().bytes_reserved() == 0);
  workers.clear();  // their caches outlive every copy: all transfers were finalized above
}

TEST_CASE_TEMPLATE("shutdown under load: later calls fail with shut_down, held transfers and tickets outlive "
                   "the engine",
                   Stack, host_stack, s3fifo_inline_stack, partial_two_thread_stack, numa_pool_stack) {
  using Engine = typename Stack::engine;
  const auto cfg = stress_config<Stack>();
  const double budget = 0.4 * stress_seconds();
  watchdog wd(seconds_f(8 * budget + 120), "the shutdown case");
  std::optional<Engine> e(Engine::create(cfg).value());
  const model m(cfg, *e, Stack::mixed_sizes);
  problem_log log;
  std::mt19937 rng(7);
  const auto t0 = steady::now();
  std::size_t rounds = 0, post_calls = 0;
  tally all;
  while (rounds < 2 || seconds_f(steady::now() - t0).count() < budget) {
    if (!e) e.emplace(Engine::create(cfg).value());
    std::atomic<bool> shut{false}, stop{false};
    std::latch parked(worker_threads), gone(1);
    std::vector<std::unique_ptr<worker<Engine>>> workers;
    for (unsigned t = 0; t < worker_threads; ++t)
      workers.push_back(std::make_unique<worker<Engine>>(*e, m, log, 7000 + 100 * rounds + t, &shut));
    std::vector<std::thread> pool;
    for (auto& w : workers)
      pool.emplace_back([&, w = w.get()] {
        while (!stop.load(std::memory_order_acquire)) w->run_one();
        parked.count_down();
        gone.wait();
        w->after_engine_gone();
      });
    std::this_thread::sleep_for(std::chrono::milliseconds(10 + rng() % 90));
    {
      watchdog shutdown_wd(seconds_f(60), "shutdown() with 8 threads mid-call");
      e->shutdown();
    }
    shut.store(true, std::memory_order_release);
    const auto s = e->stats();
    CHECK(s.current_bytes == 0);
    CHECK(s.chunks == 0);
    CHECK(e->get_allocator().bytes_reserved() == 0);
    CHECK(snapshot_problem(s, cfg.capacity_bytes).empty());
    CHECK(prometheus_problems(to_prometheus(s), s).empty());
    // Every thread makes a few calls that begin after shutdown() returned.
    const auto until = steady::now() + std::chrono::seconds(30);
    while (steady::now() < until &&
           std::any_of(workers.begin(), workers.end(), [](const auto& w) { return w->post_shutdown_calls.load() < 4; }))
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    stop.store(true, std::memory_order_release);
    parked.wait();
    {
      watchdog destroy_wd(seconds_f(60), "destroying an engine after shutdown()");
      e.reset();
    }
    gone.count_down();
    for (auto& t : pool) t.join();
    for (const auto& w : workers) {
      post_calls += w->post_shutdown_calls.load();
      all += w->counts;
    }
    ++rounds;
  }
  MESSAGE(doctest::toString<Stack>() << ": " << rounds << " rounds, " << post_calls << " calls after shutdown; "
                                     << op_summary(all, seconds_f(steady::now() - t0).count()));
  CHECK_MESSAGE(log.count() == 0, log.summary());
  CHECK(post_calls >= rounds * worker_threads * 4);
}
