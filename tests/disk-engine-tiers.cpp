// An engine with a disk tier below host memory (`tiered_backend<cpu_backend, disk_tier>`), on real
// files in a fresh temporary directory: write-through and write-back demotion, lookups and
// retrieves through the tier, promotion that stops cleanly at a corrupt chunk, prefetch, the
// promotion timeout, a full demotion queue, persistence across engines, stats and Prometheus.

#include <doctest/doctest.h>

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "tier_support.hpp"

#include "kvortex/kvortex.hpp"
#include "kvortex/tiers/disk_tier.hpp"

namespace {

namespace fs = std::filesystem;
using kvt::retrieve_checked;
using kvt::store_prompt;
using kvortex::disk_tier;
using kvortex::disk_tier_config;
using kvortex::engine_config;
using kvortex::write_policy;
using disk_engine = kvortex::tiered_host_engine<disk_tier>;
using disk_backend = kvortex::tiered_backend<kvortex::cpu_backend, disk_tier>;

struct scratch_dir {
  scratch_dir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-tiers-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  scratch_dir(const scratch_dir&) = delete;
  scratch_dir& operator=(const scratch_dir&) = delete;
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string path;
};

engine_config tiered_config(std::size_t memory_chunks, write_policy w = write_policy::write_through) {
  auto c = kvt::small_config(memory_chunks);
  c.tiering.write = w;
  c.tiering.tier_threads = 1;
  return c;
}

disk_tier_config disk_config(const engine_config& c, const std::string& dir) {
  disk_tier_config d;
  d.directory = dir;
  d.capacity_bytes = std::uint64_t{4} << 20;
  d.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
  return d;
}

disk_engine make_engine(const engine_config& c, const std::string& dir) {
  auto tier = disk_tier::open(disk_config(c, dir));
  REQUIRE_MESSAGE(tier.has_value(), tier.error().message);
  auto e = disk_engine::create(c, disk_backend(kvortex::cpu_backend{}, std::move(*tier)));
  REQUIRE_MESSAGE(e.has_value(), e.error().message);
  return std::move(*e);
}

std::size_t chunk_files(const std::string& dir) {
  std::size_t n = 0;
  for (const auto& f : fs::recursive_directory_iterator(dir))
    if (f.is_regular_file() && f.path().filename().string().front() != '.') ++n;
  return n;
}

std::string chunk_file(const std::string& dir, const kvortex::chunk_key& k) {
  const std::string hex = k.hex();
  return dir + "/" + hex.substr(0, 2) + "/" + hex;
}

}  // namespace

TEST_CASE("engine tiers: write-through puts every stored chunk on disk, and a new engine serves them") {
  scratch_dir d;
  const auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(8 * c.chunk_tokens, 1);
  {
    auto e = make_engine(c, d.path);
    CHECK(store_prompt(e, tokens) == tokens.size());
    e.flush();
    const auto s = e.stats();
    REQUIRE(s.tiers.size() == 1);
    CHECK(s.tiers[0].name == "disk");
    CHECK(s.tiers[0].demoted_chunks == 8);
    CHECK(s.tiers[0].tier.writes == 8);
    CHECK(s.demotions_queued == 8);
    CHECK(s.demotions_dropped == 0);
    CHECK(s.demotion_queue_depth == 0);
    CHECK(chunk_files(d.path) == 8);
    // In memory as well: a lookup credits memory only.
    auto where = e.lookup_tiers(tokens);
    REQUIRE(where.has_value());
    CHECK(where->tokens == tokens.size());
    CHECK(where->memory_tokens == tokens.size());
    REQUIRE(where->tiers.size() == 1);
    CHECK(where->tiers[0].tokens == 0);
  }
  auto e = make_engine(c, d.path);  // a restart: memory is empty, the disk is not
  auto where = e.lookup_tiers(tokens);
  REQUIRE(where.has_value());
  CHECK(where->tokens == tokens.size());
  CHECK(where->memory_tokens == 0);
  CHECK(where->tiers[0].tier == "disk");
  CHECK(where->tiers[0].tokens == tokens.size());
  CHECK(*e.lookup(tokens) == tokens.size());
  CHECK(retrieve_checked(e, tokens) == tokens.size());
  const auto s = e.stats();
  CHECK(s.tiers[0].promoted_chunks == 8);
  CHECK(s.tiers[0].tier.hits == 8);
  CHECK(s.retrieved_chunks == 8);
  CHECK(s.chunks == 8);  // promoted chunks stay in memory
  // Now in memory: served without touching the disk again.
  CHECK(retrieve_checked(e, tokens) == tokens.size());
  CHECK(e.stats().tiers[0].tier.hits == 8);
  // Promoted chunks are known to be below: nothing is demoted again.
  e.flush();
  CHECK(e.stats().demotions_queued == 0);
}

TEST_CASE("engine tiers: a prefix partly in memory and partly on disk is served whole") {
  scratch_dir d;
  const auto c = tiered_config(4);  // memory holds 4 chunks
  const auto a = kvt::make_tokens(4 * c.chunk_tokens, 2);
  const auto b = kvt::make_tokens(4 * c.chunk_tokens, 3);
  auto e = make_engine(c, d.path);
  CHECK(store_prompt(e, a) == a.size());
  e.flush();
  CHECK(store_prompt(e, b) == b.size());  // evicts a from memory: a is still on disk
  e.flush();
  CHECK(e.stats().evictions == 4);
  auto where = e.lookup_tiers(a);
  REQUIRE(where.has_value());
  CHECK(where->memory_tokens == 0);
  CHECK(where->tiers[0].tokens == a.size());
  // a's first two chunks back in memory (by a prefetch of that prefix), the rest on disk.
  const std::vector<kvortex::token_id> head(a.begin(), a.begin() + 2 * static_cast<std::ptrdiff_t>(c.chunk_tokens));
  auto p = e.prefetch(head);
  REQUIRE(p.has_value());
  CHECK(*p->wait() == head.size());
  where = e.lookup_tiers(a);
  CHECK(where->memory_tokens == head.size());
  CHECK(where->tiers[0].tokens == a.size() - head.size());
  CHECK(where->tokens == a.size());
  CHECK(retrieve_checked(e, a) == a.size());
  CHECK(e.stats().prefetches == 1);
}

TEST_CASE("engine tiers: write-back demotes only on eviction") {
  scratch_dir d;
  const auto c = tiered_config(4, write_policy::write_back);
  const auto a = kvt::make_tokens(4 * c.chunk_tokens, 4);
  const auto b = kvt::make_tokens(4 * c.chunk_tokens, 5);
  auto e = make_engine(c, d.path);
  CHECK(store_prompt(e, a) == a.size());
  e.flush();
  CHECK(e.stats().demotions_queued == 0);
  CHECK(chunk_files(d.path) == 0);
  CHECK(store_prompt(e, b) == b.size());  // a's four chunks are evicted and go down
  e.flush();
  const auto s = e.stats();
  CHECK(s.evictions == 4);
  CHECK(s.demotions_queued == 4);
  CHECK(s.tiers[0].demoted_chunks == 4);
  CHECK(chunk_files(d.path) == 4);
  CHECK(*e.lookup(a) == a.size());
  CHECK(retrieve_checked(e, a) == a.size());  // brings a up, evicting b, which goes down in turn
  e.flush();
  CHECK(chunk_files(d.path) == 8);
  CHECK(retrieve_checked(e, b) == b.size());
  // Promoted chunks are already below: evicting them again writes nothing.
  CHECK(e.stats().demotions_queued == 8);
}

TEST_CASE("engine tiers: a corrupt chunk on disk ends the hit there, with correct bytes before it") {
  scratch_dir d;
  const auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(6 * c.chunk_tokens, 6);
  std::vector<kvortex::chunk_key> keys;
  {
    auto e = make_engine(c, d.path);
    CHECK(store_prompt(e, tokens) == tokens.size());
    keys = *e.chunk_keys(tokens);
  }
  {  // flip one payload byte of chunk 3
    std::fstream f(chunk_file(d.path, keys[3]), std::ios::in | std::ios::out | std::ios::binary);
    REQUIRE(f.good());
    f.seekg(4096 + 100);
    char byte = 0;
    f.read(&byte, 1);
    byte = static_cast<char>(byte ^ 0x5A);
    f.seekp(4096 + 100);
    f.write(&byte, 1);
  }
  auto e = make_engine(c, d.path);
  CHECK(*e.lookup(tokens) == tokens.size());  // listed: the corruption shows only when read
  CHECK(retrieve_checked(e, tokens) == 3 * c.chunk_tokens);
  auto s = e.stats();
  CHECK(s.tiers[0].promoted_chunks == 3);
  CHECK(s.tiers[0].promotion_failures == 1);
  CHECK(s.tiers[0].tier.corrupt_removed == 1);
  CHECK(s.chunks == 3);  // nothing of the failed chunk or after it stays reserved
  // The corrupt file is gone: the hit now ends there for lookups too.
  CHECK(*e.lookup(tokens) == 3 * c.chunk_tokens);
}

TEST_CASE("engine tiers: layered retrieve brings chunks up before the layers are copied") {
  scratch_dir d;
  const auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(5 * c.chunk_tokens, 7);
  {
    auto e = make_engine(c, d.path);
    CHECK(store_prompt(e, tokens) == tokens.size());
  }
  auto e = make_engine(c, d.path);
  kvt::paged_cache dst(c.geometry, tokens.size() / c.block_tokens + 1, c.block_tokens);
  auto op = e.begin_retrieve(tokens, dst.layout());
  REQUIRE(op.has_value());
  CHECK(op->tokens() == tokens.size());
  for (std::size_t l = 0; l < c.geometry.num_layers; ++l) REQUIRE(op->submit_layer(l).has_value());
  auto t = op->finish();
  REQUIRE(t.has_value());
  CHECK(*t->wait() == tokens.size());
  CHECK(dst.mismatches(tokens, tokens.size(), {}) == 0);
}

TEST_CASE("engine tiers: a zero promotion timeout serves only what is in memory") {
  scratch_dir d;
  auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(4 * c.chunk_tokens, 8);
  {
    auto e = make_engine(c, d.path);
    CHECK(store_prompt(e, tokens) == tokens.size());
  }
  c.tiering.promotion_timeout = std::chrono::milliseconds(0);
  auto e = make_engine(c, d.path);
  CHECK(*e.lookup(tokens) == tokens.size());
  CHECK(retrieve_checked(e, tokens) == 0);
  CHECK(e.stats().promotion_timeouts == 1);
  CHECK(e.stats().chunks == 0);
}

TEST_CASE("engine tiers: a full demotion queue drops demotions, counted, and the store does not wait") {
  scratch_dir d;
  auto c = tiered_config(64);
  c.tiering.demotion_queue_chunks = 1;
  const auto tokens = kvt::make_tokens(16 * c.chunk_tokens, 9);
  auto e = make_engine(c, d.path);
  CHECK(store_prompt(e, tokens) == tokens.size());
  e.flush();
  const auto s = e.stats();
  CHECK(s.demotions_dropped >= 1);
  CHECK(s.demotions_queued + s.demotions_dropped == 16);
  CHECK(s.tiers[0].demoted_chunks == s.demotions_queued);
  CHECK(chunk_files(d.path) == s.demotions_queued);
  // Every chunk is still served from memory.
  CHECK(retrieve_checked(e, tokens) == tokens.size());
}

TEST_CASE("engine tiers: shutdown drains queued demotions, so a restart finds every chunk") {
  scratch_dir d;
  const auto c = tiered_config(256);
  std::vector<std::vector<kvortex::token_id>> prompts;
  for (std::uint32_t i = 0; i < 8; ++i) prompts.push_back(kvt::make_tokens(8 * c.chunk_tokens, 100 + i));
  {
    auto e = make_engine(c, d.path);
    for (const auto& p : prompts) CHECK(store_prompt(e, p) == p.size());
    // No flush: the destructor writes what is still queued.
  }
  CHECK(chunk_files(d.path) == 64);
  auto e = make_engine(c, d.path);
  for (const auto& p : prompts) CHECK(retrieve_checked(e, p) == p.size());
}

TEST_CASE("engine tiers: a tier that refuses writes costs demotions, never stores or hits") {
  scratch_dir d;
  const auto c = tiered_config(64);
  auto dc = disk_config(c, d.path);
  dc.max_chunk_bytes = 1024;  // below one chunk: every put is refused
  auto tier = disk_tier::open(dc);
  REQUIRE(tier.has_value());
  auto e = disk_engine::create(c, disk_backend(kvortex::cpu_backend{}, std::move(*tier)));
  REQUIRE(e.has_value());
  const auto tokens = kvt::make_tokens(4 * c.chunk_tokens, 10);
  CHECK(store_prompt(*e, tokens) == tokens.size());
  e->flush();
  const auto s = e->stats();
  CHECK(s.tiers[0].demotion_failures == 4);
  CHECK(s.tiers[0].demoted_chunks == 0);
  CHECK(retrieve_checked(*e, tokens) == tokens.size());
}

TEST_CASE("engine tiers: tier counters reach the Prometheus text, labelled by tier") {
  scratch_dir d;
  const auto c = tiered_config(64);
  auto e = make_engine(c, d.path);
  const auto tokens = kvt::make_tokens(2 * c.chunk_tokens, 11);
  CHECK(store_prompt(e, tokens) == tokens.size());
  e.flush();
  const auto text = kvortex::to_prometheus(e.stats());
  CHECK(text.find("kvortex_tier_demoted_chunks_total{tier=\"disk\"} 2\n") != std::string::npos);
  CHECK(text.find("kvortex_tier_writes_total{tier=\"disk\"} 2\n") != std::string::npos);
  CHECK(text.find("kvortex_demotions_queued_total 2\n") != std::string::npos);
  CHECK(text.find("kvortex_tier_write_seconds_bucket{tier=\"disk\",le=\"+Inf\"} 2\n") != std::string::npos);
  CHECK(text.find("# TYPE kvortex_tier_read_seconds histogram\n") != std::string::npos);
}

TEST_CASE("engine tiers: two processes, one after the other, share chunks through the directory") {
  scratch_dir d;
  const auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(6 * c.chunk_tokens, 12);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 1;
    {
      auto tier = disk_tier::open(disk_config(c, d.path));
      if (tier) {
        auto e = disk_engine::create(c, disk_backend(kvortex::cpu_backend{}, std::move(*tier)));
        if (e) {
          kvt::paged_cache src(c.geometry, tokens.size() / c.block_tokens + 1, c.block_tokens);
          src.fill(tokens, {});
          auto t = e->store(tokens, src.layout());
          if (t && t->wait() && (e->flush(), e->stats().tiers[0].demoted_chunks == 6)) code = 0;
        }
      }
    }
    ::_exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  auto e = make_engine(c, d.path);
  CHECK(retrieve_checked(e, tokens) == tokens.size());
}

TEST_CASE("engine tiers: a different namespace never sees the chunks") {
  scratch_dir d;
  auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(3 * c.chunk_tokens, 13);
  {
    auto e = make_engine(c, d.path);
    CHECK(store_prompt(e, tokens) == tokens.size());
  }
  c.ns.cache_salt = "tenant-b";
  auto e = make_engine(c, d.path);
  CHECK(*e.lookup(tokens) == 0);
  CHECK(retrieve_checked(e, tokens) == 0);
}

TEST_CASE("engine tiers: two live engine processes share one directory in shared mode") {
  scratch_dir d;
  const auto c = tiered_config(64);
  const auto tokens = kvt::make_tokens(6 * c.chunk_tokens, 14);
  auto shared = [&] {
    auto dc = disk_config(c, d.path);
    dc.sharing = kvortex::directory_sharing::shared;
    return dc;
  };
  // The other process is forked before any engine (and its threads) exists here: a child forked
  // from a threaded process may find a lock (malloc's, the sanitizer's) held forever.
  int to_parent[2], to_child[2];
  REQUIRE(::pipe(to_parent) == 0);
  REQUIRE(::pipe(to_child) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    char ok = 'n', go = 0;
    if (::read(to_child[0], &go, 1) == 1) {  // the parent's engine is open
      auto t = disk_tier::open(shared());
      if (t) {
        auto e = disk_engine::create(c, disk_backend(kvortex::cpu_backend{}, std::move(*t)));
        if (e) {
          kvt::paged_cache src(c.geometry, tokens.size() / c.block_tokens + 1, c.block_tokens);
          src.fill(tokens, {});
          auto s = e->store(tokens, src.layout());
          if (s && s->wait()) {
            e->flush();
            if (e->stats().tiers[0].demoted_chunks == 6) ok = 'y';
          }
          (void)!::write(to_parent[1], &ok, 1);
          char done = 0;
          (void)!::read(to_child[0], &done, 1);  // stay alive (and hold the directory) until the parent read
          ::_exit(ok == 'y' ? 0 : 1);
        }
      }
    }
    (void)!::write(to_parent[1], &ok, 1);
    ::_exit(1);
  }
  // This process opens its engine first, so it learns of the other's chunks only through the disk.
  auto tier = disk_tier::open(shared());
  REQUIRE(tier.has_value());
  auto mine = disk_engine::create(c, disk_backend(kvortex::cpu_backend{}, std::move(*tier)));
  REQUIRE(mine.has_value());
  CHECK(*mine->lookup(tokens) == 0);
  const char go = 'g';
  REQUIRE(::write(to_child[1], &go, 1) == 1);
  char ok = 0;
  REQUIRE(::read(to_parent[0], &ok, 1) == 1);
  CHECK(ok == 'y');
  auto where = mine->lookup_tiers(tokens);
  REQUIRE(where.has_value());
  CHECK(where->tiers[0].tokens == tokens.size());
  CHECK(retrieve_checked(*mine, tokens) == tokens.size());
  const char done = 'd';
  REQUIRE(::write(to_child[1], &done, 1) == 1);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  for (int fd : {to_parent[0], to_parent[1], to_child[0], to_child[1]}) ::close(fd);
}
