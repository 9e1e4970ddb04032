#pragma once
// Shared by the fuzz targets: a reader that turns fuzz bytes into values, a failure report that
// aborts (so libFuzzer records the input), and an independent model of every layout factory's
// documented tensor shape, to check what kv_layout computes against what its docs promise.

#include <kvortex/kvortex.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvfuzz {

// For the oracles' byte-by-byte loops: no coverage instrumentation, since their branches only
// say whether a check passed, and instrumented they take most of the run time. ASan and UBSan
// stay on.
#if defined(__clang__)
#define KVFUZZ_ORACLE __attribute__((no_sanitize("coverage")))
#else
#define KVFUZZ_ORACLE
#endif

// Prints what broke and aborts: libFuzzer (and ASan's abort handler) keep the input as a crash.
[[noreturn]] inline void failure(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "\n==kvortex-fuzz== %s:%d: %s\n", file, line, what.c_str());
  std::fflush(stderr);
  std::abort();
}

#define KVFUZZ_CHECK(cond, what)                                                  \
  do {                                                                            \
    if (!(cond)) ::kvfuzz::failure(__FILE__, __LINE__, std::string(#cond) + ": " + (what)); \
  } while (0)

// Every error the library hands back must say what went wrong.
inline void check_error(const kvortex::error& e, const char* call) {
  KVFUZZ_CHECK(!e.message.empty(), std::string(call) + " failed with an empty message (code " +
                                       std::string(kvortex::to_string(e.code)) + ")");
}

// Open defects a fuzzer can steer around while they are being fixed, so that a long run finds
// the next one: KVORTEX_FUZZ_AVOID holds their names, comma-separated, or "all". Unset (as in CI),
// every input is tried and every check runs, so the regression inputs fail until the fix lands.
[[nodiscard]] inline bool avoid(std::string_view defect) {
  static const std::string names = [] {
    const char* e = std::getenv("KVORTEX_FUZZ_AVOID");
    return "," + std::string(e == nullptr ? "" : e) + ",";
  }();
  return names.find(",all,") != std::string::npos || names.find("," + std::string(defect) + ",") != std::string::npos;
}

// KVORTEX_FUZZ_TRACE set: the targets print what each input does, to read a crash's story.
[[nodiscard]] inline bool tracing() {
  static const bool on = std::getenv("KVORTEX_FUZZ_TRACE") != nullptr;
  return on;
}
inline void trace(const std::string& line) {
  if (tracing()) std::fprintf(stderr, "  %s\n", line.c_str());
}

// Reads values from the front of the input; once it is used up every read yields zero, so any
// prefix of an input is itself a valid, shorter input.
class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  [[nodiscard]] bool empty() const noexcept { return at_ >= size_; }
  [[nodiscard]] std::size_t left() const noexcept { return empty() ? 0 : size_ - at_; }

  std::uint8_t u8() noexcept { return at_ < size_ ? data_[at_++] : 0; }
  std::uint16_t u16() noexcept { return static_cast<std::uint16_t>(u8() | (unsigned{u8()} << 8)); }
  std::uint32_t u32() noexcept { return u16() | (std::uint32_t{u16()} << 16); }
  std::uint64_t u64() noexcept { return u32() | (std::uint64_t{u32()} << 32); }
  bool flag() noexcept { return (u8() & 1) != 0; }

  // A value in [0, n); 0 when n == 0.
  std::size_t below(std::size_t n) noexcept {
    if (n <= 1) return 0;
    if (n <= 256) return u8() % n;
    if (n <= 65536) return u16() % n;
    return static_cast<std::size_t>(u64() % n);
  }

  // Mostly a small value in [0, small_max]; one time in 16 a wild one (0, a power of two, the
  // type's limits, or raw bits), to reach the overflow and limit checks.
  std::uint64_t size_value(std::uint64_t small_max) noexcept {
    const std::uint8_t b = u8();
    if (b < 240) return small_max == 0 ? 0 : b % (small_max + 1);
    switch (b & 7) {
      case 0: return 0;
      case 1: return std::uint64_t{1} << (u8() % 64);
      case 2: return (std::uint64_t{1} << (u8() % 64)) - 1;
      case 3: return u32();
      case 4: return u64();
      case 5: return std::uint64_t{0xFFFFFFFF};
      case 6: return ~std::uint64_t{0};
      default: return small_max + 1 + u8();
    }
  }

  // Up to `max` bytes as a string (any byte values, NULs included).
  std::string text(std::size_t max) {
    const std::size_t n = below(max + 1);
    std::string s;
    for (std::size_t i = 0; i < n && !empty(); ++i) s.push_back(static_cast<char>(u8()));
    return s;
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t at_{0};
};

// a * b, or nullopt when it does not fit in 64 bits.
[[nodiscard]] inline std::optional<std::uint64_t> mul(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}
[[nodiscard]] inline std::optional<std::uint64_t> mul(std::initializer_list<std::uint64_t> fs) {
  std::uint64_t r = 1;
  for (const auto f : fs) {
    const auto m = mul(r, f);
    if (!m) return std::nullopt;
    r = *m;
  }
  return r;
}

// The factories of kv_layout, one entry each (NHD and HND count as two).
enum class layout_kind : std::uint8_t {
  contiguous,
  flash_attn_nhd,
  flash_attn_hnd,
  flashinfer_nhd,
  flashinfer_hnd,
  mla,
  cross_layer,
  cross_layer_blocks_outermost,
  pages,
  strided,
};
inline constexpr std::size_t layout_kinds = 10;

// A layout as its factory's documentation describes it, computed here from the documented tensor
// shape and not from the library's strides: where element (layer, plane, block, slot, head) lives,
// and how many bytes the caller's tensor spans.
struct layout_shape {
  layout_kind kind{layout_kind::contiguous};
  kvortex::kv_geometry g{};
  std::size_t num_blocks{1};    // contiguous: unused (one block)
  std::size_t block_tokens{1};  // contiguous: max_tokens
  std::size_t page_stride{0};   // pages
  std::int64_t plane_stride{0}, block_stride{0}, token_stride{0}, head_stride{0};  // strided
  std::size_t layer_bytes{0};   // strided

  // All layers in one tensor whose base is the first pointer.
  [[nodiscard]] bool one_tensor() const noexcept {
    return kind == layout_kind::cross_layer || kind == layout_kind::cross_layer_blocks_outermost;
  }
  [[nodiscard]] std::size_t blocks() const noexcept { return kind == layout_kind::contiguous ? 1 : num_blocks; }
  [[nodiscard]] std::size_t row() const noexcept { return g.row_bytes(); }
  [[nodiscard]] std::size_t head_bytes() const noexcept { return std::size_t{g.head_dim} * g.element_bytes; }

  // Bytes of each layer's tensor (one_tensor: of the whole tensor), nullopt past 64 bits.
  [[nodiscard]] std::optional<std::uint64_t> extent() const {
    const std::uint64_t heads = g.kv_heads, hd = g.head_dim, eb = g.element_bytes, bt = block_tokens, nb = num_blocks;
    switch (kind) {
      case layout_kind::contiguous: return mul({g.kv_planes, bt, heads, hd, eb});
      case layout_kind::flash_attn_nhd:
      case layout_kind::flash_attn_hnd:
      case layout_kind::flashinfer_nhd:
      case layout_kind::flashinfer_hnd: return mul({2, nb, bt, heads, hd, eb});
      case layout_kind::mla: return mul({nb, bt, heads, hd, eb});
      case layout_kind::cross_layer:
      case layout_kind::cross_layer_blocks_outermost: return mul({g.num_layers, g.kv_planes, nb, bt, heads, hd, eb});
      case layout_kind::pages: {
        const auto page = mul({g.kv_planes, bt, heads, hd, eb});
        const auto before = nb == 0 ? std::optional<std::uint64_t>{0} : mul(nb - 1, page_stride);
        if (!page || !before || *before + *page < *before) return std::nullopt;
        return *before + *page;
      }
      case layout_kind::strided: return layer_bytes;
    }
    return std::nullopt;
  }

  // Offset of element (l, p, b, s, h) from its layer's pointer (one_tensor: from the base).
  // Only meaningful when extent() is known; wraps like unsigned arithmetic otherwise.
  [[nodiscard]] std::uint64_t offset(std::uint64_t l, std::uint64_t p, std::uint64_t b, std::uint64_t s,
                                     std::uint64_t h) const noexcept {
    const std::uint64_t r = row(), hb = head_bytes(), bt = block_tokens, nb = num_blocks, planes = g.kv_planes;
    switch (kind) {
      case layout_kind::contiguous: return p * bt * r + s * r + h * hb;  // [planes][max_tokens][heads][dim]
      case layout_kind::flash_attn_nhd: return p * nb * bt * r + b * bt * r + s * r + h * hb;  // [2][nb][bt][h][d]
      case layout_kind::flash_attn_hnd: return p * nb * bt * r + b * bt * r + h * bt * hb + s * hb;  // [2][nb][h][bt][d]
      case layout_kind::flashinfer_nhd: return b * 2 * bt * r + p * bt * r + s * r + h * hb;  // [nb][2][bt][h][d]
      case layout_kind::flashinfer_hnd: return b * 2 * bt * r + p * bt * r + h * bt * hb + s * hb;  // [nb][2][h][bt][d]
      case layout_kind::mla: return b * bt * r + s * r + h * hb;  // [nb][bt][d]
      case layout_kind::cross_layer:  // [layers][planes][nb][bt][h][d]
        return l * planes * nb * bt * r + p * nb * bt * r + b * bt * r + s * r + h * hb;
      case layout_kind::cross_layer_blocks_outermost:  // [nb][layers][planes][bt][h][d]
        return b * g.num_layers * planes * bt * r + l * planes * bt * r + p * bt * r + s * r + h * hb;
      case layout_kind::pages: return b * page_stride + p * bt * r + s * r + h * hb;  // a page: [plane][token][row]
      case layout_kind::strided:
        return p * static_cast<std::uint64_t>(plane_stride) + b * static_cast<std::uint64_t>(block_stride) +
               s * static_cast<std::uint64_t>(token_stride) + h * static_cast<std::uint64_t>(head_stride);
    }
    return 0;
  }

  [[nodiscard]] kvortex::result<kvortex::kv_layout> build(std::span<std::byte* const> ptrs) const {
    using kvortex::kv_layout;
    using kvortex::kv_order;
    switch (kind) {
      case layout_kind::contiguous: return kv_layout::contiguous(ptrs, g, block_tokens);
      case layout_kind::flash_attn_nhd: return kv_layout::flash_attn(ptrs, g, num_blocks, block_tokens, kv_order::nhd);
      case layout_kind::flash_attn_hnd: return kv_layout::flash_attn(ptrs, g, num_blocks, block_tokens, kv_order::hnd);
      case layout_kind::flashinfer_nhd: return kv_layout::flashinfer(ptrs, g, num_blocks, block_tokens, kv_order::nhd);
      case layout_kind::flashinfer_hnd: return kv_layout::flashinfer(ptrs, g, num_blocks, block_tokens, kv_order::hnd);
      case layout_kind::mla: return kv_layout::mla(ptrs, g, num_blocks, block_tokens);
      case layout_kind::cross_layer:
        return kv_layout::cross_layer(ptrs.empty() ? nullptr : ptrs[0], g, num_blocks, block_tokens, false);
      case layout_kind::cross_layer_blocks_outermost:
        return kv_layout::cross_layer(ptrs.empty() ? nullptr : ptrs[0], g, num_blocks, block_tokens, true);
      case layout_kind::pages: return kv_layout::pages(ptrs, g, num_blocks, block_tokens, page_stride);
      case layout_kind::strided:
        return kv_layout::strided(ptrs, g, num_blocks, block_tokens, plane_stride, block_stride, token_stride,
                                  head_stride, layer_bytes);
    }
    return kvortex::fail(kvortex::errc::internal, "unknown layout kind");
  }

  // Whether the factory's documented preconditions hold for this shape (with one pointer per
  // layer, none null), for the factories that take no caller-chosen strides.
  [[nodiscard]] bool documented_valid() const noexcept {
    if (g.num_layers == 0 || g.kv_heads == 0 || g.head_dim == 0 || g.element_bytes == 0) return false;
    if (g.kv_planes != 1 && g.kv_planes != 2) return false;
    if (block_tokens == 0 || (kind != layout_kind::contiguous && num_blocks == 0)) return false;
    switch (kind) {
      case layout_kind::flash_attn_nhd:
      case layout_kind::flash_attn_hnd:
      case layout_kind::flashinfer_nhd:
      case layout_kind::flashinfer_hnd: return g.kv_planes == 2;
      case layout_kind::mla: return g.kv_planes == 1 && g.kv_heads == 1;
      case layout_kind::pages: return page_stride >= std::uint64_t{g.kv_planes} * block_tokens * row();
      default: return true;
    }
  }
};

// A deterministic, address-independent byte pattern (fills caches and chunk buffers).
[[nodiscard]] inline std::byte pattern(std::uint64_t seed, std::uint64_t i) noexcept {
  std::uint64_t h = (seed + 1) * 0x9E3779B97F4A7C15ULL ^ (i + 0x632BE59BD9B4E019ULL) * 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 31;
  h *= 0x94D049BB133111EBULL;
  h ^= h >> 29;
  return static_cast<std::byte>(h & 0xFF);
}

}  // namespace kvfuzz
