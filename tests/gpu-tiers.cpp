// The CUDA stack with a storage tier below its pinned host memory: a store from a device cache
// goes down to the tier; a new engine (host memory empty) brings it up and copies it into another
// device cache, bit for bit, pipelined and layer by layer. With the disk tier where xxHash is
// installed, and always with a tier kept in process memory (so the promotion path into device
// memory is covered on machines without xxHash).

#include <doctest/doctest.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>

#include <stdlib.h>

#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gpu_support.hpp"

#if __has_include(<xxhash.h>)
#include "kvortex/tiers/disk_tier.hpp"
#endif

namespace {

using namespace kvg;

// Chunks in a map shared by every tier made from it (a process-local stand-in for a shared store).
struct shared_map {
  std::mutex m;
  std::map<kvortex::chunk_key, std::vector<std::byte>> chunks;
};
class map_tier {
 public:
  static constexpr std::string_view name = "map";
  explicit map_tier(std::shared_ptr<shared_map> s) : s_(std::move(s)) {}
  kvortex::result<void> put(const kvortex::chunk_key& k, std::span<const std::byte> in) {
    std::lock_guard lk(s_->m);
    s_->chunks[k].assign(in.begin(), in.end());
    return {};
  }
  kvortex::result<std::size_t> get(const kvortex::chunk_key& k, std::span<std::byte> out) {
    std::lock_guard lk(s_->m);
    const auto it = s_->chunks.find(k);
    if (it == s_->chunks.end()) return kvortex::fail(kvortex::errc::not_found, "map tier: absent");
    if (out.size() < it->second.size()) return kvortex::fail(kvortex::errc::size_mismatch, "map tier: small buffer");
    std::memcpy(out.data(), it->second.data(), it->second.size());
    return it->second.size();
  }
  std::size_t contains(std::span<const kvortex::chunk_key> keys) {
    std::lock_guard lk(s_->m);
    std::size_t n = 0;
    while (n < keys.size() && s_->chunks.count(keys[n]) != 0) ++n;
    return n;
  }
  void remove(const kvortex::chunk_key& k) noexcept {
    std::lock_guard lk(s_->m);
    s_->chunks.erase(k);
  }
  [[nodiscard]] kvortex::tier_stats stats() const { return {}; }

 private:
  std::shared_ptr<shared_map> s_;
};
static_assert(kvortex::storage_tier<map_tier>);

#if __has_include(<xxhash.h>)
using tiered_gpu_engine = kvortex::tiered_engine<kvortex::disk_tier>;
using tiered_gpu_backend = kvortex::tiered_backend<kvortex::cpu_backend, kvortex::disk_tier>;
#endif

struct gpu_scratch_dir {
  gpu_scratch_dir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-gpu-tiers-XXXXXX";
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  gpu_scratch_dir(const gpu_scratch_dir&) = delete;
  gpu_scratch_dir& operator=(const gpu_scratch_dir&) = delete;
  ~gpu_scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

#if __has_include(<xxhash.h>)
tiered_gpu_engine make_tiered(const kvortex::engine_config& c, const std::string& dir) {
  kvortex::disk_tier_config d;
  d.directory = dir;
  d.capacity_bytes = std::uint64_t{256} << 20;
  d.ns = kvortex::tier_namespace<kvortex::sha256_hasher>(c).value();
  auto tier = kvortex::disk_tier::open(d);
  REQUIRE_MESSAGE(tier.has_value(), tier.error().message);
  auto e = tiered_gpu_engine::create(c, tiered_gpu_backend(kvortex::cpu_backend{}, std::move(*tier)));
  REQUIRE_MESSAGE(e.has_value(), e.error().message);
  return std::move(*e);
}
#endif

kvortex::tiered_engine<map_tier> make_mapped(const kvortex::engine_config& c, const std::shared_ptr<shared_map>& m) {
  auto e = kvortex::tiered_engine<map_tier>::create(c, kvortex::tiered_backend<kvortex::cpu_backend, map_tier>(kvortex::cpu_backend{}, map_tier(m)));
  REQUIRE_MESSAGE(e.has_value(), e.error().message);
  return std::move(*e);
}

const layout_case& flash_nhd(const std::vector<layout_case>& all) {
  for (const auto& l : all)
    if (l.name == "flash_attn_nhd") return l;
  FAIL("no flash_attn_nhd layout");
  return all.front();
}

}  // namespace

TEST_CASE("gpu: tiered engine over a process-local tier: device cache -> tier -> new engine -> device cache, bit-exact") {
  KVG_REQUIRE_GPU();
  const auto layouts = all_layouts(2);
  const auto& lc = flash_nhd(layouts);
  auto c = config_for(lc.geometry, 64);
  c.store_partial_chunks = false;
  const std::size_t n = 320;
  const auto toks = tokens(n, 78);
  const auto ts = random_table(n / 16, 48, 7), td = random_table(n / 16, 48, 8);
  device_cache src(lc, 48, 16);
  src.randomize(4);
  auto shared = std::make_shared<shared_map>();
  {
    auto e = make_mapped(c, shared);
    auto st = e.store(toks, src.device_layout(), ts);
    REQUIRE(st.has_value());
    REQUIRE(st->wait().has_value());
  }  // shutdown drains the demotions
  CHECK(shared->chunks.size() == 10);
  auto e = make_mapped(c, shared);
  device_cache dst(lc, 48, 16);
  dst.randomize(5);
  auto rt = e.retrieve(toks, dst.device_layout(), td);
  REQUIRE(rt.has_value());
  CHECK(*rt->wait() == n);
  CHECK(e.stats().tiers[0].promoted_chunks == 10);
  auto img = image(src.mirror_layout(), ts, n);
  apply(dst.mirror_layout(), td, n, img);
  CHECK(differences(dst.download(), dst.host) == 0);
}

#if __has_include(<xxhash.h>)
TEST_CASE("gpu: tiered engine: device cache -> disk -> restart -> device cache, bit-exact") {
  KVG_REQUIRE_GPU();
  gpu_scratch_dir dir;
  const auto layouts = all_layouts(2);
  const auto& lc = flash_nhd(layouts);
  auto c = config_for(lc.geometry, 64);
  c.store_partial_chunks = false;
  const std::size_t n = 320;  // 10 chunks of 32
  const auto toks = tokens(n, 77);
  const auto ts = random_table(n / 16, 48, 5), td = random_table(n / 16, 48, 6);
  device_cache src(lc, 48, 16);
  src.randomize(1);
  {
    auto e = make_tiered(c, dir.path);
    auto st = e.store(toks, src.device_layout(), ts);
    REQUIRE(st.has_value());
    REQUIRE(st->wait().has_value());
    e.flush();
    CHECK(e.stats().tiers[0].demoted_chunks == 10);
  }
  auto img = image(src.mirror_layout(), ts, n);
  SUBCASE("pipelined retrieve") {
    auto e = make_tiered(c, dir.path);
    device_cache dst(lc, 48, 16);
    dst.randomize(2);
    auto rt = e.retrieve(toks, dst.device_layout(), td);
    REQUIRE(rt.has_value());
    auto got = rt->wait();
    REQUIRE(got.has_value());
    CHECK(*got == n);
    CHECK(e.stats().tiers[0].promoted_chunks == 10);
    apply(dst.mirror_layout(), td, n, img);
    CHECK(differences(dst.download(), dst.host) == 0);
  }
  SUBCASE("layer by layer") {
    auto e = make_tiered(c, dir.path);
    device_cache dst(lc, 48, 16);
    dst.randomize(3);
    auto op = e.begin_retrieve(toks, dst.device_layout(), td);
    REQUIRE(op.has_value());
    CHECK(op->tokens() == n);
    for (std::size_t l = 0; l < c.geometry.num_layers; ++l) REQUIRE(op->submit_layer(l).has_value());
    auto t = op->finish();
    REQUIRE(t.has_value());
    CHECK(*t->wait() == n);
    apply(dst.mirror_layout(), td, n, img);
    CHECK(differences(dst.download(), dst.host) == 0);
  }
}

#endif
