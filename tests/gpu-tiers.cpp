// The CUDA stack with a disk tier below its pinned host memory (`tiered_engine<disk_tier>`): a
// store from a device cache goes down to disk; a new engine (host memory empty) brings it up and
// copies it into another device cache, bit for bit, pipelined and layer by layer.

#include <doctest/doctest.h>

#if __has_include(<xxhash.h>)

#include <stdlib.h>

#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gpu_support.hpp"

#include "kvortex/tiers/disk_tier.hpp"

namespace {

using namespace kvg;
using tiered_gpu_engine = kvortex::tiered_engine<kvortex::disk_tier>;
using tiered_gpu_backend = kvortex::tiered_backend<kvortex::cpu_backend, kvortex::disk_tier>;

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

const layout_case& flash_nhd(const std::vector<layout_case>& all) {
  for (const auto& l : all)
    if (l.name == "flash_attn_nhd") return l;
  FAIL("no flash_attn_nhd layout");
  return all.front();
}

}  // namespace

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
