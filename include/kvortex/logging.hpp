#pragma once
/// @file logging.hpp
/// @brief The process-wide log of events an operator must hear about (a tier lost and regained,
/// corrupt entries removed, a full disk, dropped demotions, a slow tier).
///
/// Silent by default: nothing is formatted or written until the application installs a sink with
/// `set_log_sink`, e.g. a callback into the server's own logger, or `stderr_log_sink()`.
/// Repeats of one (component, event) pair are rate-limited: at most `per_event` records per
/// `interval` reach the sink (5 per 10 s unless `set_log_rate_limit` says otherwise); the records
/// held back are counted and the count travels in the next record of that pair that gets through.
/// Every function here is thread-safe and none lets an exception out.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace kvortex {

/// @brief How much a record matters; a sink receives records at or above its minimum level.
enum class log_level : std::uint8_t {
  debug,    ///< detail for a developer chasing a problem
  info,     ///< a normal change of state (a connection restored, a slot map reloaded)
  warning,  ///< lost work or a degraded tier the engine keeps serving through
  error,    ///< a failure an operator must act on
  off,      ///< as a minimum level: nothing is logged
};

/// @brief Stable lower-case name of a level: "debug", "info", "warning", "error", "off".
[[nodiscard]] constexpr std::string_view to_string(log_level l) noexcept {
  switch (l) {
    case log_level::debug: return "debug";
    case log_level::info: return "info";
    case log_level::warning: return "warning";
    case log_level::error: return "error";
    case log_level::off: return "off";
  }
  return "unknown";
}

/// @brief One logged event, as a sink receives it. The views are valid only during the call.
struct log_record {
  log_level level;             ///< never `off`
  std::string_view component;  ///< where it happened: "disk", "redis", "engine", "config"
  std::string_view event;      ///< short stable id, e.g. "connection_lost", "corrupt_entry_removed"
  std::string_view message;    ///< human-readable detail naming the server, file or key
  std::uint64_t suppressed;    ///< records of this (component, event) the rate limit held back since the last one delivered
};

/// @brief Receives log records. Called from whichever thread logs, with no lock of the logger
/// held, so it may log or call `set_log_sink` itself; it should return quickly. An exception it
/// throws is caught and discarded.
using log_sink = std::function<void(const log_record&)>;

namespace detail {

// Nested sink calls allowed per thread: a sink that logs from inside itself is served this deep,
// then its records are dropped (the rate limit alone would end the recursion, but only after
// per_event levels of nesting per event).
inline constexpr int max_log_nesting = 4;

struct log_window {
  std::chrono::steady_clock::time_point start{};
  std::uint32_t delivered{0};   // records delivered since start
  std::uint64_t suppressed{0};  // records held back, not yet reported
};

struct log_state {
  std::atomic<std::uint8_t> min_level{static_cast<std::uint8_t>(log_level::off)};
  std::mutex mutex;  // guards everything below
  std::shared_ptr<const log_sink> sink;
  std::uint32_t per_event{5};
  std::chrono::milliseconds interval{10'000};
  std::unordered_map<std::string, log_window> windows;  // key: component '\0' event
};

[[nodiscard]] inline log_state& log_state_instance() noexcept {
  static log_state state;
  return state;
}

[[nodiscard]] inline int& log_nesting() noexcept {
  thread_local int depth = 0;
  return depth;
}

/// @brief Whether a record of `level` would reach a sink now (one relaxed atomic load), so a call
/// site builds its message only when it is wanted.
[[nodiscard]] inline bool log_enabled(log_level level) noexcept {
  return level != log_level::off &&
         static_cast<std::uint8_t>(level) >=
             log_state_instance().min_level.load(std::memory_order_relaxed);
}

/// @brief Hands one record to the sink unless the level filter, the rate limit of
/// (component, event) or the nesting limit holds it back. Never throws: an allocation failure or a
/// throwing sink loses the record and nothing else.
inline void log(log_level level, std::string_view component, std::string_view event,
                std::string message) noexcept {
  if (!log_enabled(level)) return;
  int& depth = log_nesting();
  if (depth >= max_log_nesting) return;
  try {
    std::shared_ptr<const log_sink> sink;
    std::uint64_t suppressed = 0;
    {
      auto& s = log_state_instance();
      std::lock_guard lock(s.mutex);
      // The level may have been raised (or the sink removed) since the unlocked check.
      if (!s.sink || static_cast<std::uint8_t>(level) < s.min_level.load(std::memory_order_relaxed)) return;
      if (s.per_event != 0 && s.interval.count() > 0) {
        std::string key;
        key.reserve(component.size() + 1 + event.size());
        key.append(component).push_back('\0');
        key.append(event);
        const auto now = std::chrono::steady_clock::now();
        // Stale windows go once the map grows large, so arbitrary event names cannot grow it
        // without bound; a pair with held-back records keeps its window so its count survives.
        if (s.windows.size() >= 1024 && !s.windows.contains(key)) {
          std::erase_if(s.windows, [&](const auto& kv) {
            return kv.second.suppressed == 0 && now - kv.second.start >= s.interval;
          });
        }
        auto [it, fresh] = s.windows.try_emplace(std::move(key));
        log_window& w = it->second;
        if (fresh || now - w.start >= s.interval) {
          w.start = now;
          w.delivered = 0;
        }
        if (w.delivered >= s.per_event) {
          ++w.suppressed;
          return;
        }
        ++w.delivered;
        suppressed = std::exchange(w.suppressed, 0);
      }
      sink = s.sink;
    }
    const log_record record{level, component, event, message, suppressed};
    ++depth;
    try {
      (*sink)(record);
    } catch (...) {
      // A sink's failure must not become the caller's.
    }
    --depth;
  } catch (...) {
    // Out of memory while keying the window or copying the sink: the record is lost.
  }
}

}  // namespace detail

/// @brief Installs the process-wide sink and the lowest level it receives. An empty sink (the
/// default) makes logging silent, whatever `min_level` says. Safe to call while other threads log:
/// a record being delivered to the old sink finishes there.
inline void set_log_sink(log_sink sink, log_level min_level = log_level::info) noexcept {
  auto& s = detail::log_state_instance();
  std::shared_ptr<const log_sink> next;
  if (sink) {
    try {
      next = std::make_shared<const log_sink>(std::move(sink));
    } catch (...) {
      next.reset();  // out of memory: stay silent rather than throw
    }
  }
  const auto level = next ? min_level : log_level::off;
  std::shared_ptr<const log_sink> old;
  {
    std::lock_guard lock(s.mutex);
    old = std::exchange(s.sink, std::move(next));
    s.min_level.store(static_cast<std::uint8_t>(level), std::memory_order_relaxed);
  }
  // `old` is released here, outside the lock: its destructor may log.
}

/// @brief Sets the rate limit: at most `per_event` records of each (component, event) pair per
/// `interval`, counted from the first record of a window. `per_event == 0` or a non-positive
/// `interval` turns the limit off. Takes effect from the next record; held-back counts are kept.
inline void set_log_rate_limit(std::uint32_t per_event, std::chrono::milliseconds interval) noexcept {
  auto& s = detail::log_state_instance();
  std::lock_guard lock(s.mutex);
  s.per_event = per_event;
  s.interval = interval;
}

/// @brief A sink that writes each record to stderr as one line, e.g.
/// `2026-01-31T12:00:00.123Z kvortex warning redis connection_lost: 127.0.0.1:6379: ... (3 suppressed)`
/// (UTC time). The line is written with one `fwrite`, so lines of concurrent records do not mix.
[[nodiscard]] inline log_sink stderr_log_sink() {
  return [](const log_record& r) {
    const auto now = std::chrono::system_clock::now();
    const std::time_t t = std::chrono::system_clock::to_time_t(now);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
    std::tm tm{};
    char stamp[40] = "";
    if (gmtime_r(&t, &tm) != nullptr) {
      const std::size_t n = std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
      std::snprintf(stamp + n, sizeof stamp - n, ".%03dZ ", static_cast<int>(ms));
    }
    std::string line(stamp);
    line += "kvortex ";
    line += to_string(r.level);
    line += ' ';
    line += r.component;
    line += ' ';
    line += r.event;
    line += ": ";
    line += r.message;
    if (r.suppressed != 0) {
      line += " (";
      line += std::to_string(r.suppressed);
      line += " suppressed)";
    }
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stderr);
  };
}

}  // namespace kvortex
