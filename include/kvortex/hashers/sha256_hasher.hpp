#pragma once
/// @file sha256_hasher.hpp
/// @brief SHA-256 chunk keys through OpenSSL 3's EVP interface.

#include <openssl/evp.h>

#include <cstddef>
#include <exception>
#include <memory>
#include <span>
#include <string_view>
#include <utility>

#include "kvortex/concepts/hasher.hpp"
#include "kvortex/detail/token_bytes.hpp"
#include "kvortex/error.hpp"
#include "kvortex/types.hpp"

namespace kvortex {

/// @brief Chains chunk keys with SHA-256, the hash vLLM uses by default.
///
/// `root(seed) = SHA-256("kvortex-root\0" || seed)`;
/// `chain(parent, tokens) = SHA-256(parent's 32 bytes || tokens || width)`, each token in `width`
/// little-endian bytes: 3 when all ids of the chunk are below 2^24, else 4
/// (`detail::for_each_compact_chain_bytes`; a quarter fewer bytes to digest).
/// Collision resistant, so tenants that do not trust each other can share a store (given a
/// per-tenant `cache_salt`). OpenSSL picks SHA-NI or ARMv8 SHA instructions where present.
///
/// The algorithm is fetched once in `create` and shared by copies; each thread keeps an initialised
/// template context and a working one, so `chain` neither allocates nor re-initialises (OpenSSL's
/// init costs as much as hashing a kilobyte). Thread-safe.
class sha256_hasher {
 public:
  static constexpr std::string_view name = "sha256";

  /// @brief Fetches SHA-256 from OpenSSL's default provider.
  /// @return `errc::unsupported` when the provider has no SHA-256 (e.g. a FIPS setup without it).
  [[nodiscard]] static result<sha256_hasher> create() {
    EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (md == nullptr) return fail(errc::unsupported, "sha256_hasher: OpenSSL has no SHA256 digest");
    return sha256_hasher(std::shared_ptr<EVP_MD>(md, &EVP_MD_free));
  }

  /// @brief The root key of a chain for a serialized namespace `seed`.
  [[nodiscard]] chunk_key root(std::span<const std::byte> seed) const noexcept {
    EVP_MD_CTX* ctx = begin();
    EVP_DigestUpdate(ctx, detail::root_prefix, sizeof detail::root_prefix);
    if (!seed.empty()) EVP_DigestUpdate(ctx, seed.data(), seed.size());
    return finish(ctx);
  }

  /// @brief The key of the chunk `tokens` following the chunk keyed `parent`.
  [[nodiscard]] chunk_key chain(const chunk_key& parent, std::span<const token_id> tokens) const noexcept {
    EVP_MD_CTX* ctx = begin();
    detail::for_each_compact_chain_bytes(parent, tokens,
                                         [ctx](const void* p, std::size_t n) { EVP_DigestUpdate(ctx, p, n); });
    return finish(ctx);
  }

 private:
  explicit sha256_hasher(std::shared_ptr<EVP_MD> md) noexcept : md_(std::move(md)) {}

  struct ctx_deleter {
    void operator()(EVP_MD_CTX* c) const noexcept { EVP_MD_CTX_free(c); }
  };

  // OpenSSL only fails these on allocation failure or a null algorithm, neither of which can
  // happen once create() succeeded and the context exists; a context that cannot be made is fatal.
  EVP_MD_CTX* begin() const noexcept {
    struct contexts {
      std::unique_ptr<EVP_MD_CTX, ctx_deleter> fresh{EVP_MD_CTX_new()}, work{EVP_MD_CTX_new()};
      const EVP_MD* md{nullptr};
    };
    thread_local contexts c;
    if (c.fresh == nullptr || c.work == nullptr) std::terminate();
    if (c.md != md_.get()) {  // first use on this thread, or another fetch of the algorithm
      if (EVP_DigestInit_ex2(c.fresh.get(), md_.get(), nullptr) != 1) std::terminate();
      c.md = md_.get();
    }
    if (EVP_MD_CTX_copy_ex(c.work.get(), c.fresh.get()) != 1) std::terminate();
    return c.work.get();
  }

  static chunk_key finish(EVP_MD_CTX* ctx) noexcept {
    chunk_key k;
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx, reinterpret_cast<unsigned char*>(k.bytes.data()), &len);
    return k;
  }

  std::shared_ptr<EVP_MD> md_;
};

static_assert(hasher<sha256_hasher>, "sha256_hasher does not satisfy kvortex::hasher");

}  // namespace kvortex
