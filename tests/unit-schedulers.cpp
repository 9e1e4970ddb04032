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

// 2D ops: groups of "heads" whose rows interleave in the destination (pitch = heads * bytes, as
// HND heads in a chunk), each read from its own rows at a random pitch; plus 1D ops and lone 2D
// ops with gaps between their destination rows. The gaps must stay untouched.
struct batch_2d_fixture {
  std::vector<std::byte> src, dst, expect;
  std::vector<copy_op> ops;
  explicit batch_2d_fixture(unsigned seed, std::size_t groups = 60) {
    std::mt19937 rng(seed);
    struct spec {
      std::size_t src_off, dst_off, bytes, rows, sp, dp;
    };
    std::vector<spec> specs;
    std::size_t src_at = 0, dst_at = 0;
    for (std::size_t g = 0; g < groups; ++g) {
      const unsigned kind = rng() % 4;
      const std::size_t bytes = 1 + rng() % (kind == 0 ? 3000 : 300);
      const std::size_t rows = kind == 0 ? 1 : 1 + rng() % 20;
      const std::size_t heads = kind == 1 ? 1 : 1 + rng() % 4;
      const std::size_t dp = kind == 1 ? bytes + 1 + rng() % 40 : heads * bytes;  // kind 1: gaps
      for (std::size_t h = 0; h < heads; ++h) {
        const std::size_t sp = bytes + (rng() % 3 == 0 ? 0 : rng() % 48);
        specs.push_back({src_at, dst_at + h * bytes, bytes, rows, sp, dp});
        src_at += (rows - 1) * sp + bytes + rng() % 16;
      }
      dst_at += (rows - 1) * dp + heads * bytes + rng() % 16;
    }
    src.resize(src_at);
    for (auto& b : src) b = static_cast<std::byte>(rng());
    dst.assign(dst_at, std::byte{0});
    expect.assign(dst_at, std::byte{0});
    for (const auto& x : specs) {
      ops.push_back({src.data() + x.src_off, dst.data() + x.dst_off, x.bytes, x.rows, x.sp, x.dp});
      copy_host({src.data() + x.src_off, expect.data() + x.dst_off, x.bytes, x.rows, x.sp, x.dp});
    }
  }
  bool correct() const { return dst == expect; }
};

}  // namespace

TEST_CASE("copy_host copies a 2D op whole or in any split of its bytes") {
  batch_2d_fixture f(7, 40);
  std::mt19937 rng(3);
  for (const auto& op : f.ops) {
    const std::size_t n = total_bytes(op);
    std::size_t at = 0;
    while (at < n) {
      const std::size_t next = std::min(n, at + 1 + rng() % 700);
      copy_host(op, at, next);
      at = next;
    }
  }
  CHECK(f.correct());
}

// One batch through `s`: it completes once, successfully, and copies exactly what it should.
template <class S, class Fixture>
void check_one_batch(S& s, const Fixture& f) {
  std::atomic<int> calls{0};
  s.submit(f.ops, [&](result<void> r) {
    CHECK(r.has_value());
    calls.fetch_add(1);
  });
  s.drain();
  CHECK(calls.load() == 1);
  CHECK(f.correct());
}

TEST_CASE_TEMPLATE("schedulers copy 2D ops exactly and leave gaps alone", S, inline_transfer_scheduler,
                   host_transfer_scheduler, split_pool, kvt::gated_scheduler) {
  S s;
  for (unsigned seed = 0; seed < 6; ++seed) check_one_batch(s, batch_2d_fixture(50 + seed));
}

TEST_CASE_TEMPLATE("schedulers copy every byte and complete once", S, inline_transfer_scheduler,
                   host_transfer_scheduler, split_pool) {
  S s;
  for (unsigned seed = 0; seed < 5; ++seed) check_one_batch(s, batch_fixture(seed));
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
