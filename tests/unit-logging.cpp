// The process-wide log: silent by default, level filter, fields, rate limit, thread safety.

#include <doctest/doctest.h>

#include "kvortex/logging.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

using namespace kvortex;
using namespace std::chrono_literals;

namespace {

// Leaves the process as a fresh one finds it, whatever the test changed.
struct log_guard {
  log_guard() { set_log_rate_limit(0, 0ms); }
  ~log_guard() {
    set_log_sink({});
    set_log_rate_limit(5, 10'000ms);
  }
  log_guard(const log_guard&) = delete;
  log_guard& operator=(const log_guard&) = delete;
};

struct stored_record {
  log_level level;
  std::string component, event, message;
  std::uint64_t suppressed;
};

// A sink that keeps a copy of every record.
struct recorder {
  std::mutex mutex;
  std::vector<stored_record> records;
  log_sink sink() {
    return [this](const log_record& r) {
      std::lock_guard lock(mutex);
      records.push_back({r.level, std::string(r.component), std::string(r.event), std::string(r.message), r.suppressed});
    };
  }
  std::size_t count(std::string_view event) {
    std::lock_guard lock(mutex);
    std::size_t n = 0;
    for (const auto& r : records) n += r.event == event ? 1 : 0;
    return n;
  }
};

}  // namespace

TEST_CASE("logging: silent until a sink is set") {
  log_guard guard;
  for (auto l : {log_level::debug, log_level::info, log_level::warning, log_level::error}) {
    CHECK_FALSE(detail::log_enabled(l));
  }
  CHECK_FALSE(detail::log_enabled(log_level::off));
  detail::log(log_level::error, "test", "nobody_listens", "dropped");  // must not crash

  recorder rec;
  set_log_sink(rec.sink(), log_level::debug);
  CHECK(detail::log_enabled(log_level::debug));
  set_log_sink({}, log_level::debug);  // an empty sink silences whatever the level
  CHECK_FALSE(detail::log_enabled(log_level::error));
  detail::log(log_level::error, "test", "after_removal", "dropped");
  CHECK(rec.records.empty());
}

TEST_CASE("logging: the minimum level filters records") {
  log_guard guard;
  recorder rec;
  set_log_sink(rec.sink(), log_level::warning);
  CHECK_FALSE(detail::log_enabled(log_level::debug));
  CHECK_FALSE(detail::log_enabled(log_level::info));
  CHECK(detail::log_enabled(log_level::warning));
  CHECK(detail::log_enabled(log_level::error));
  CHECK_FALSE(detail::log_enabled(log_level::off));
  detail::log(log_level::debug, "test", "d", "");
  detail::log(log_level::info, "test", "i", "");
  detail::log(log_level::warning, "test", "w", "");
  detail::log(log_level::error, "test", "e", "");
  detail::log(log_level::off, "test", "o", "");
  REQUIRE(rec.records.size() == 2);
  CHECK(rec.records[0].event == "w");
  CHECK(rec.records[1].event == "e");

  set_log_sink(rec.sink(), log_level::off);  // a sink with level off hears nothing
  detail::log(log_level::error, "test", "e2", "");
  CHECK(rec.records.size() == 2);
}

TEST_CASE("logging: the sink receives every field of the record") {
  log_guard guard;
  recorder rec;
  set_log_sink(rec.sink());  // default minimum: info
  CHECK_FALSE(detail::log_enabled(log_level::debug));
  detail::log(log_level::warning, "redis", "connection_lost", "127.0.0.1:6379: Connection refused");
  REQUIRE(rec.records.size() == 1);
  const auto& r = rec.records[0];
  CHECK(r.level == log_level::warning);
  CHECK(r.component == "redis");
  CHECK(r.event == "connection_lost");
  CHECK(r.message == "127.0.0.1:6379: Connection refused");
  CHECK(r.suppressed == 0);
  CHECK(to_string(log_level::warning) == "warning");
}

TEST_CASE("logging: repeats beyond the rate limit are counted and reported in the next record") {
  log_guard guard;
  recorder rec;
  set_log_sink(rec.sink());
  // A window long enough that the whole burst falls into it, whatever the machine's speed.
  set_log_rate_limit(3, 3'600'000ms);
  for (int i = 0; i < 10; ++i) detail::log(log_level::warning, "disk", "write_failed", "burst " + std::to_string(i));
  for (int i = 0; i < 2; ++i) detail::log(log_level::warning, "disk", "disk_full", "other event");
  for (int i = 0; i < 4; ++i) detail::log(log_level::warning, "redis", "write_failed", "other component");
  CHECK(rec.count("write_failed") == 6);  // 3 of disk's, 3 of redis': limited per (component, event)
  CHECK(rec.count("disk_full") == 2);
  REQUIRE(rec.records.size() == 8);
  CHECK(rec.records[2].message == "burst 2");
  for (const auto& r : rec.records) CHECK(r.suppressed == 0);

  // The window ends: the next record carries what the limit held back (7 of disk's, 1 of redis').
  set_log_rate_limit(3, 1ms);
  std::this_thread::sleep_for(5ms);
  detail::log(log_level::warning, "disk", "write_failed", "after the window");
  detail::log(log_level::warning, "redis", "write_failed", "after the window");
  detail::log(log_level::warning, "disk", "disk_full", "after the window");
  REQUIRE(rec.records.size() == 11);
  CHECK(rec.records[8].component == "disk");
  CHECK(rec.records[8].suppressed == 7);
  CHECK(rec.records[9].component == "redis");
  CHECK(rec.records[9].suppressed == 1);
  CHECK(rec.records[10].suppressed == 0);

  // The count is reported once.
  std::this_thread::sleep_for(5ms);
  detail::log(log_level::warning, "disk", "write_failed", "again");
  REQUIRE(rec.records.size() == 12);
  CHECK(rec.records[11].suppressed == 0);

  // Limit off: everything passes.
  set_log_rate_limit(0, 10'000ms);
  for (int i = 0; i < 20; ++i) detail::log(log_level::info, "engine", "unlimited", "");
  CHECK(rec.count("unlimited") == 20);
}

TEST_CASE("logging: a throwing sink does not reach the caller") {
  log_guard guard;
  int calls = 0;
  set_log_sink([&](const log_record&) {
    ++calls;
    throw std::runtime_error("sink failed");
  });
  detail::log(log_level::error, "test", "throws", "x");
  detail::log(log_level::error, "test", "throws", "y");
  CHECK(calls == 2);
  static_assert(noexcept(detail::log(log_level::error, "", "", std::string())));
}

TEST_CASE("logging: a sink may log and set a sink from inside itself") {
  log_guard guard;
  recorder rec;
  std::atomic<int> outer_calls{0};
  set_log_sink([&](const log_record& r) {
    if (r.event == "outer") {
      ++outer_calls;
      detail::log(log_level::info, "test", "inner", "logged by the sink");
      set_log_sink(rec.sink());  // replace itself while running
      detail::log(log_level::info, "test", "after_swap", "logged by the old sink");
    }
  });
  detail::log(log_level::info, "test", "outer", "first");
  CHECK(outer_calls == 1);
  // "inner" reached the sink running then (which ignores it), "after_swap" the recorder.
  CHECK(rec.count("inner") == 0);
  CHECK(rec.count("after_swap") == 1);
  detail::log(log_level::info, "test", "outer", "second");
  CHECK(outer_calls == 1);
  CHECK(rec.count("outer") == 1);

  // A sink that logs every record it receives ends: the nesting limit stops it.
  std::atomic<int> depth_calls{0};
  set_log_sink([&](const log_record&) {
    ++depth_calls;
    detail::log(log_level::info, "test", "echo", "again");
  });
  detail::log(log_level::info, "test", "echo", "start");
  CHECK(depth_calls == detail::max_log_nesting);
}

TEST_CASE("logging: 8 threads log while the sink is swapped") {
  log_guard guard;
  set_log_rate_limit(0, 0ms);
  constexpr int threads = 8;
  constexpr int per_thread = 2000;
  std::atomic<std::uint64_t> seen_a{0}, seen_b{0}, bad_fields{0};
  auto counting = [&](std::atomic<std::uint64_t>& seen) -> log_sink {
    return [&](const log_record& r) {
      if (r.component != "stress" || r.event != "tick" || r.message.empty()) bad_fields.fetch_add(1);
      seen.fetch_add(1, std::memory_order_relaxed);
    };
  };
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      for (int i = 0; i < per_thread; ++i) {
        if (detail::log_enabled(log_level::info)) {
          detail::log(log_level::info, "stress", "tick", "thread " + std::to_string(t));
        }
      }
    });
  }
  go = true;
  for (int i = 0; i < 500; ++i) {
    set_log_sink(counting(i % 2 == 0 ? seen_a : seen_b));
    if (i % 50 == 0) set_log_sink({});
    if (i % 100 == 0) set_log_rate_limit(i % 200 == 0 ? 0 : 1'000'000, 10'000ms);
  }
  for (auto& th : pool) th.join();
  CHECK(bad_fields == 0);
  CHECK(seen_a + seen_b <= std::uint64_t{threads} * per_thread);

  // The last sink installed gets everything logged after the threads are done.
  std::atomic<std::uint64_t> seen_last{0};
  set_log_sink(counting(seen_last));
  set_log_rate_limit(0, 0ms);
  for (int i = 0; i < 100; ++i) detail::log(log_level::info, "stress", "tick", "after");
  CHECK(seen_last == 100);
  CHECK(bad_fields == 0);
}

TEST_CASE("logging: the stderr sink writes one line per record") {
  log_guard guard;
  // Point stderr at a temporary file for the duration, then read back what the sink wrote.
  std::fflush(stderr);
  const int saved = ::dup(2);
  REQUIRE(saved >= 0);
  std::FILE* capture = std::tmpfile();
  REQUIRE(capture != nullptr);
  REQUIRE(::dup2(::fileno(capture), 2) == 2);
  auto sink = stderr_log_sink();
  sink(log_record{log_level::warning, "redis", "connection_lost", "127.0.0.1:1: refused", 3});
  set_log_sink(std::move(sink), log_level::error);
  detail::log(log_level::warning, "test", "below_level", "not written");
  detail::log(log_level::error, "disk", "disk_full", "/tmp/x: No space left on device");
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::string text;
  std::rewind(capture);
  char buf[512];
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, capture)) > 0;) text.append(buf, n);
  std::fclose(capture);

  std::vector<std::string> lines;
  for (std::size_t pos = 0, nl; (nl = text.find('\n', pos)) != std::string::npos; pos = nl + 1) {
    lines.push_back(text.substr(pos, nl - pos));
  }
  REQUIRE_MESSAGE(lines.size() == 2, "captured: " << text);
  CHECK(text.back() == '\n');
  // "YYYY-MM-DDTHH:MM:SS.mmmZ kvortex <level> <component> <event>: <message>[ (N suppressed)]"
  CHECK(lines[0].size() > 25);
  CHECK(lines[0][10] == 'T');
  CHECK(lines[0][23] == 'Z');
  CHECK(lines[0].substr(25) == "kvortex warning redis connection_lost: 127.0.0.1:1: refused (3 suppressed)");
  CHECK(lines[1].substr(25) == "kvortex error disk disk_full: /tmp/x: No space left on device");
}
