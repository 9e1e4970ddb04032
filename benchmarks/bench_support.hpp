#pragma once
// What every benchmark file needs: stop loudly when set-up fails, instead of timing nothing.

#include <kvortex/error.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

namespace kvb {

[[noreturn]] inline void die(const std::string& what, const kvortex::error& e) {
  std::fprintf(stderr, "%s: %s\n", what.c_str(), e.message.c_str());
  std::abort();
}

template <class T>
T take(kvortex::result<T> r, const char* what) {
  if (!r) die(what, r.error());
  if constexpr (!std::is_void_v<T>) return std::move(*r);
}

}  // namespace kvb
