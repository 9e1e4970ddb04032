// Conformance of every transfer scheduler: exact copies, one completion per batch, drain.

#include <doctest/doctest.h>

#include "test_support.hpp"

#include <atomic>
#include <thread>

using namespace kvortex;

namespace {

struct split_pool : host_transfer_scheduler {
  // Four threads and a tiny threshold, so batches really are split, ops cut mid-way.
  split_pool() : host_transfer_scheduler(4, 1000) {}
};

// Random ops over one source and one destination arena, non-overlapping.
struct batch_fixture {
  std::vector<std::byte> src, dst;
  std::vector<copy_op> ops;
  explicit batch_fixture(unsigned seed, std::size_t nops = 200) {
    std::mt19937 rng(seed);
    std::size_t total = 0;
    std::vector<std::size_t> sizes(nops);
    for (auto& s : sizes) total += (s = 1 + rng() % 3000);
    src.resize(total);
    dst.assign(total, std::byte{0});
    for (auto& b : src) b = static_cast<std::byte>(rng());
    // Destinations in shuffled order so the copy is a real permutation.
    std::vector<std::size_t> order(nops);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<std::size_t> src_off(nops), dst_off(nops);
    for (std::size_t i = 0, at = 0; i < nops; ++i) src_off[i] = at, at += sizes[i];
    for (std::size_t k = 0, at = 0; k < nops; ++k) dst_off[order[k]] = at, at += sizes[order[k]];
    for (std::size_t i = 0; i < nops; ++i) ops.push_back({src.data() + src_off[i], dst.data() + dst_off[i], sizes[i]});
  }
  bool correct() const {
    for (const auto& op : ops)
      if (std::memcmp(op.src, op.dst, op.bytes) != 0) return false;
    return true;
  }
};

}  // namespace

TEST_CASE_TEMPLATE("schedulers copy every byte and complete once", S, inline_transfer_scheduler,
                   host_transfer_scheduler, split_pool) {
  S s;
  for (unsigned seed = 0; seed < 5; ++seed) {
    batch_fixture f(seed);
    std::atomic<int> calls{0};
    s.submit(f.ops, [&](result<void> r) {
      CHECK(r.has_value());
      calls.fetch_add(1);
    });
    s.drain();
    CHECK(calls.load() == 1);
    CHECK(f.correct());
  }
}

TEST_CASE_TEMPLATE("schedulers accept batches from several threads at once", S, inline_transfer_scheduler,
                   host_transfer_scheduler, split_pool) {
  S s;
  std::vector<batch_fixture> fixtures;
  for (unsigned i = 0; i < 8; ++i) fixtures.emplace_back(100 + i, 50);
  std::atomic<int> calls{0};
  std::vector<std::thread> threads;
  for (auto& f : fixtures)
    threads.emplace_back([&s, &f, &calls] { s.submit(f.ops, [&calls](result<void>) { calls.fetch_add(1); }); });
  for (auto& t : threads) t.join();
  s.drain();
  CHECK(calls.load() == 8);
  for (const auto& f : fixtures) CHECK(f.correct());
}

TEST_CASE("an empty batch completes") {
  host_transfer_scheduler s(2, 1);
  bool done = false;
  s.submit({}, [&](result<void> r) { done = r.has_value(); });
  s.drain();
  CHECK(done);
}

TEST_CASE("host_transfer_scheduler takes its thread count from the configuration") {
  auto c = kvt::small_config();
  c.transfer_threads = 3;
  CHECK(host_transfer_scheduler(c).threads() == 3);
  CHECK(host_transfer_scheduler(1).threads() == 1);
  CHECK(host_transfer_scheduler().threads() >= 1);
}
