// Two user-written policies plugged into basic_engine:
//  - pinned_fifo_eviction: first in, first out, except for a set of pinned chunks (here the shared
//    system prompt), which go only when nothing else can;
//  - file_backend: every chunk lives in its own memory-mapped file under a temporary directory.
// A workload that overflows the capacity checks that evictions follow the policy, that the
// backend saw every chunk, and that the bytes really sit in the files.

#include <kvortex/kvortex.hpp>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

using key_set = std::unordered_set<kvortex::chunk_key, kvortex::chunk_key_hash>;

/// FIFO eviction that keeps pinned chunks until no other chunk is evictable. Hits do not extend a
/// chunk's life. Every operation is O(1). The key set is shared so the caller can fill it once the
/// engine exists to compute keys; a key counts as pinned if it is in the set when it is stored.
class pinned_fifo_eviction {
 public:
  explicit pinned_fifo_eviction(std::shared_ptr<const key_set> pinned) : pinned_(std::move(pinned)) {}

  void on_insert(const kvortex::chunk_key& k) {
    if (where_.contains(k)) return;
    const bool pin = pinned_ && pinned_->contains(k);
    auto& q = pin ? pinned_queue_ : queue_;
    q.push_back(k);
    where_.emplace(k, slot{pin, std::prev(q.end())});
  }

  void on_access(const kvortex::chunk_key&) noexcept {}

  void on_erase(const kvortex::chunk_key& k) noexcept {
    const auto it = where_.find(k);
    if (it == where_.end()) return;
    (it->second.pinned ? pinned_queue_ : queue_).erase(it->second.pos);
    where_.erase(it);
  }

  template <class Pred>
  std::optional<kvortex::chunk_key> select_victim(Pred&& evictable) {
    for (const auto* q : {&queue_, &pinned_queue_})
      for (const auto& k : *q)
        if (evictable(k)) return k;
    return std::nullopt;
  }

  [[nodiscard]] std::size_t size() const noexcept { return where_.size(); }

 private:
  struct slot {
    bool pinned;
    std::list<kvortex::chunk_key>::iterator pos;
  };
  std::shared_ptr<const key_set> pinned_;
  std::list<kvortex::chunk_key> queue_, pinned_queue_;  // oldest first
  std::unordered_map<kvortex::chunk_key, slot, kvortex::chunk_key_hash> where_;
};

static_assert(kvortex::eviction_policy<pinned_fifo_eviction>,
              "pinned_fifo_eviction does not satisfy kvortex::eviction_policy");

/// What file_backend did; shared, since the engine owns the backend once created.
struct file_traffic {
  std::string dir;
  std::atomic<std::uint64_t> reserved{0}, committed{0}, released{0}, bytes_committed{0};
};

/// Keeps each chunk in `<dir>/<key hex>`, mapped shared: the transfer scheduler writes the file's
/// pages directly and commit starts their write-back. Memory for the bytes comes from the page
/// cache, not from the engine's allocator.
class file_backend {
 public:
  struct handle {
    std::byte* data;
    std::size_t bytes;
  };

  static kvortex::result<file_backend> create(std::shared_ptr<file_traffic> traffic) {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvortex-chunks-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr)
      return kvortex::fail(kvortex::errc::backend_failure, "mkdtemp: " + std::string(std::strerror(errno)));
    traffic->dir = tmpl;
    return file_backend(std::move(traffic));
  }

  file_backend(file_backend&& o) noexcept : t_(std::move(o.t_)) {}
  file_backend& operator=(file_backend&&) = delete;
  ~file_backend() {
    if (t_) ::rmdir(t_->dir.c_str());  // empty by now: the engine released every chunk
  }

  template <class A>
  kvortex::result<handle> reserve(A&, const kvortex::chunk_key& k, std::size_t n) {
    const std::string path = path_of(k);
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return sys_error("open " + path);
    // Allocate the blocks now, so a full disk shows up here (as out_of_memory: the engine evicts).
    if (const int e = ::posix_fallocate(fd, 0, static_cast<off_t>(n)); e != 0) {
      ::close(fd);
      ::unlink(path.c_str());
      if (e == ENOSPC) return kvortex::fail(kvortex::errc::out_of_memory, "file_backend: disk full");
      return kvortex::fail(kvortex::errc::backend_failure, "posix_fallocate " + path + ": " + std::strerror(e));
    }
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);  // the mapping keeps the file open
    if (p == MAP_FAILED) {
      auto err = sys_error("mmap " + path);
      ::unlink(path.c_str());
      return err;
    }
    t_->reserved.fetch_add(1, std::memory_order_relaxed);
    return handle{static_cast<std::byte*>(p), n};
  }

  std::span<std::byte> data(handle h) const noexcept { return {h.data, h.bytes}; }

  kvortex::result<void> commit(const kvortex::chunk_key&, handle h) {
    if (::msync(h.data, h.bytes, MS_ASYNC) != 0) return sys_error("msync");
    t_->committed.fetch_add(1, std::memory_order_relaxed);
    t_->bytes_committed.fetch_add(h.bytes, std::memory_order_relaxed);
    return {};
  }

  template <class A>
  void release(A&, const kvortex::chunk_key& k, handle h) noexcept {
    ::munmap(h.data, h.bytes);
    ::unlink(path_of(k).c_str());
    t_->released.fetch_add(1, std::memory_order_relaxed);
  }

  std::string path_of(const kvortex::chunk_key& k) const { return t_->dir + "/" + k.hex(); }

 private:
  explicit file_backend(std::shared_ptr<file_traffic> t) : t_(std::move(t)) {}
  static std::unexpected<kvortex::error> sys_error(const std::string& what) {
    return kvortex::fail(kvortex::errc::backend_failure, what + ": " + std::strerror(errno));
  }
  std::shared_ptr<file_traffic> t_;
};

static_assert(kvortex::backend<file_backend, kvortex::host_allocator>,
              "file_backend does not satisfy kvortex::backend");

// Tiny model: 2 layers x 2 planes x 2 heads x 64 bf16 = 1 KiB a token; 64-token chunks of 64 KiB.
constexpr kvortex::kv_geometry geometry{
    .num_layers = 2, .kv_planes = 2, .kv_heads = 2, .head_dim = 64, .element_bytes = 2};
constexpr std::size_t chunk_tokens = 64;
constexpr std::size_t chunk_bytes = chunk_tokens * geometry.token_bytes();
constexpr std::size_t capacity_chunks = 8;
constexpr std::size_t system_tokens = 2 * chunk_tokens;
constexpr std::size_t request_tokens = system_tokens + 2 * chunk_tokens;  // 2 pinned + 2 own chunks
constexpr std::size_t num_requests = 6;

// A request: the shared system prompt, then tokens of its own.
std::vector<kvortex::token_id> request(std::size_t r) {
  std::vector<kvortex::token_id> t(request_tokens);
  for (std::size_t i = 0; i < t.size(); ++i)
    t[i] = static_cast<kvortex::token_id>(i < system_tokens ? 1 + i : 100000 * (r + 1) + i);
  return t;
}

std::byte pattern(kvortex::token_id tok, std::size_t layer, std::size_t plane, std::size_t i) {
  return static_cast<std::byte>((static_cast<std::size_t>(tok) * 29 + layer * 101 + plane * 53 + i * 7) & 0xFF);
}

// A contiguous per-layer cache `[plane][request_tokens][row]`, as a simple server keeps it.
struct contiguous_cache {
  std::vector<std::vector<std::byte>> tensors;
  std::vector<std::byte*> ptrs;
  contiguous_cache() {
    for (std::size_t l = 0; l < geometry.num_layers; ++l) {
      tensors.emplace_back(2 * request_tokens * geometry.row_bytes());
      ptrs.push_back(tensors.back().data());
    }
  }
  std::byte* row(std::size_t l, std::size_t p, std::size_t t) {
    return ptrs[l] + (p * request_tokens + t) * geometry.row_bytes();
  }
};

int report(const kvortex::error& e) {
  std::fprintf(stderr, "error: %s\n", e.what().c_str());
  return 1;
}

kvortex::engine_config make_config() {
  kvortex::engine_config cfg;
  cfg.ns.model_id = "example/custom-policy";
  cfg.geometry = geometry;
  cfg.chunk_tokens = chunk_tokens;
  cfg.capacity_bytes = capacity_chunks * chunk_bytes;
  return cfg;
}

// Stores requests 0..5 in order; request 0 is hit (retrieved) just before it would be evicted: LRU
// would move it to the back of the queue, FIFO does not. Returns the leading tokens each request
// still finds.
template <class Engine>
kvortex::result<std::vector<std::size_t>> run_workload(Engine& engine) {
  contiguous_cache src;
  auto layout = kvortex::kv_layout::contiguous(src.ptrs, geometry, request_tokens);
  if (!layout) return std::unexpected(layout.error());
  for (std::size_t r = 0; r < num_requests; ++r) {
    const auto tokens = request(r);
    for (std::size_t l = 0; l < geometry.num_layers; ++l)
      for (std::size_t p = 0; p < 2; ++p)
        for (std::size_t t = 0; t < tokens.size(); ++t)
          for (std::size_t i = 0; i < geometry.row_bytes(); ++i) src.row(l, p, t)[i] = pattern(tokens[t], l, p, i);
    if (r == 3) {
      contiguous_cache dst;
      auto dst_layout = kvortex::kv_layout::contiguous(dst.ptrs, geometry, request_tokens);
      if (!dst_layout) return std::unexpected(dst_layout.error());
      auto t = engine.retrieve(request(0), *dst_layout);
      if (!t) return std::unexpected(t.error());
      if (auto n = t->wait(); !n) return std::unexpected(n.error());
    }
    auto t = engine.store(tokens, *layout);
    if (!t) return std::unexpected(t.error());
    if (auto n = t->wait(); !n) return std::unexpected(n.error());
  }
  std::vector<std::size_t> found;
  for (std::size_t r = 0; r < num_requests; ++r) {
    auto n = engine.lookup(request(r));
    if (!n) return std::unexpected(n.error());
    found.push_back(*n);
  }
  return found;
}

void print_found(const char* name, const std::vector<std::size_t>& found) {
  std::printf("  %-24s", name);
  for (std::size_t r = 0; r < found.size(); ++r) std::printf(" r%zu:%3zu", r, found[r]);
  std::printf("\n");
}

}  // namespace

int main() {
  using engine_t = kvortex::basic_engine<kvortex::host_allocator, kvortex::sha256_hasher, pinned_fifo_eviction,
                                         file_backend, kvortex::inline_transfer_scheduler>;
  const auto cfg = make_config();
  auto traffic = std::make_shared<file_traffic>();
  auto pinned = std::make_shared<key_set>();

  std::vector<std::size_t> found;
  std::string dir;
  {
    auto backend = file_backend::create(traffic);
    if (!backend) return report(backend.error());
    auto hasher = kvortex::sha256_hasher::create();
    if (!hasher) return report(hasher.error());
    auto engine = engine_t::create(cfg, kvortex::host_allocator{}, std::move(*hasher), pinned_fifo_eviction(pinned),
                                   std::move(*backend), kvortex::inline_transfer_scheduler{});
    if (!engine) return report(engine.error());
    dir = traffic->dir;

    // Pin the system prompt's chunks.
    const auto system = request(0);
    auto keys = engine->chunk_keys(std::span(system).first(system_tokens));
    if (!keys) return report(keys.error());
    pinned->insert(keys->begin(), keys->end());

    auto r = run_workload(*engine);
    if (!r) return report(r.error());
    found = std::move(*r);

    const auto s = engine->stats();
    std::printf("%zu requests of %zu tokens (system prompt %zu), capacity %zu chunks of %zu KiB\n", num_requests,
                request_tokens, system_tokens, capacity_chunks, chunk_bytes >> 10);
    std::printf("leading tokens each request still finds:\n");
    print_found("pinned_fifo_eviction", found);
    std::printf("engine: %llu chunks stored, %llu deduplicated, %llu evicted, %llu held\n",
                static_cast<unsigned long long>(s.stored_chunks),
                static_cast<unsigned long long>(s.deduplicated_chunks), static_cast<unsigned long long>(s.evictions),
                static_cast<unsigned long long>(s.chunks));
    std::printf("file_backend: %llu reserved, %llu committed (%llu KiB), %llu released, %zu files in %s\n",
                static_cast<unsigned long long>(traffic->reserved.load()),
                static_cast<unsigned long long>(traffic->committed.load()),
                static_cast<unsigned long long>(traffic->bytes_committed.load() >> 10),
                static_cast<unsigned long long>(traffic->released.load()),
                static_cast<std::size_t>(
                    std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator{})),
                dir.c_str());

    // Expected: the system prompt survives, requests 0-2 went in FIFO order (request 0 too,
    // although it was hit just before), requests 3-5 are whole.
    const std::vector<std::size_t> expect{system_tokens,  system_tokens,  system_tokens,
                                          request_tokens, request_tokens, request_tokens};
    const std::size_t new_chunks = 2 + 2 * num_requests;
    if (found != expect || s.evictions != 6 || s.stored_chunks != new_chunks || s.chunks != capacity_chunks) {
      std::fprintf(stderr, "error: evictions did not follow pinned_fifo_eviction\n");
      return 1;
    }
    if (traffic->committed != new_chunks || traffic->released != s.evictions ||
        traffic->bytes_committed != new_chunks * chunk_bytes) {
      std::fprintf(stderr, "error: file_backend did not see every chunk\n");
      return 1;
    }

    // The first system-prompt chunk, read back from its file rather than through the mapping.
    std::ifstream f(dir + "/" + keys->front().hex(), std::ios::binary);
    std::vector<char> file_bytes(chunk_bytes);
    if (!f.read(file_bytes.data(), static_cast<std::streamsize>(file_bytes.size()))) {
      std::fprintf(stderr, "error: cannot read the chunk file of the system prompt\n");
      return 1;
    }
    std::size_t bad = 0, at = 0;
    for (std::size_t l = 0; l < geometry.num_layers; ++l)  // chunk layout: [layer][plane][token][row]
      for (std::size_t p = 0; p < 2; ++p)
        for (std::size_t t = 0; t < chunk_tokens; ++t)
          for (std::size_t i = 0; i < geometry.row_bytes(); ++i)
            bad += static_cast<std::byte>(file_bytes[at++]) != pattern(system[t], l, p, i);
    std::printf("system prompt chunk file %s...: %zu bad bytes\n", keys->front().hex().substr(0, 16).c_str(), bad);
    if (bad != 0) {
      std::fprintf(stderr, "error: the chunk file does not hold the stored KV\n");
      return 1;
    }
  }
  // The engine is gone: every chunk was released and the backend removed its directory.
  if (traffic->released != traffic->committed || std::filesystem::exists(dir)) {
    std::fprintf(stderr, "error: file_backend left chunks behind in %s\n", dir.c_str());
    return 1;
  }

  // The same workload with the stock LRU policy and the same backend, for contrast: storing a
  // chunk that is already present does not touch it, so the system prompt ages out, and with it
  // every request's chain.
  {
    auto contrast_traffic = std::make_shared<file_traffic>();
    auto backend = file_backend::create(contrast_traffic);
    if (!backend) return report(backend.error());
    auto hasher = kvortex::sha256_hasher::create();
    if (!hasher) return report(hasher.error());
    using lru_engine_t = kvortex::basic_engine<kvortex::host_allocator, kvortex::sha256_hasher, kvortex::lru_eviction,
                                               file_backend, kvortex::inline_transfer_scheduler>;
    auto engine = lru_engine_t::create(cfg, kvortex::host_allocator{}, std::move(*hasher), kvortex::lru_eviction{},
                                       std::move(*backend), kvortex::inline_transfer_scheduler{});
    if (!engine) return report(engine.error());
    auto r = run_workload(*engine);
    if (!r) return report(r.error());
    print_found("lru_eviction (contrast)", *r);
  }
  std::printf("custom_policy: OK\n");
  return 0;
}
