// kvortex._kvortex: the engine for Python. One `Engine` class over every stack this build has (host
// or CUDA, with or without disk and Redis tiers, chosen from the settings at run time), layouts
// from raw pointers (the Python package derives them from tensors), tickets and layered transfers.
// The GIL is released while copies are submitted and waited for. Errors become kvortex.Error with
// the C++ error's code and message.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <kvortex/deployment_config.hpp>
#include <kvortex/kvortex.hpp>
#include <kvortex/logging.hpp>
#include <kvortex/lookup_client.hpp>
#include <kvortex/lookup_server.hpp>
#include <kvortex/version.hpp>

#if defined(KVORTEX_WITH_XXHASH)
#include <kvortex/tiers/disk_tier.hpp>
#define KVORTEX_PY_DISK 1
#endif
#if defined(KVORTEX_WITH_XXHASH) && defined(KVORTEX_WITH_HIREDIS)
#include <kvortex/tiers/redis_tier.hpp>
#define KVORTEX_PY_REDIS 1
#endif

namespace py = pybind11;

namespace {

// ---- errors -------------------------------------------------------------------------------------

PyObject* error_type = nullptr;  // kvortex.Error, made at import

[[noreturn]] void raise(const kvortex::error& e) {
  py::object exc = py::reinterpret_borrow<py::object>(error_type)(std::string(kvortex::to_string(e.code)), e.message);
  PyErr_SetObject(error_type, exc.ptr());
  throw py::error_already_set();
}

template <class T>
T take(kvortex::result<T> r) {
  if (!r) raise(r.error());
  return std::move(*r);
}
inline void take(kvortex::result<void> r) {
  if (!r) raise(r.error());
}

// ---- arguments ----------------------------------------------------------------------------------

// Token ids from anything with the buffer protocol (int32 or int64 arrays) or a sequence of ints.
std::vector<kvortex::token_id> tokens_of(const py::handle& obj) {
  std::vector<kvortex::token_id> out;
  if (py::isinstance<py::buffer>(obj) && !py::isinstance<py::bytes>(obj)) {
    const py::buffer_info b = py::reinterpret_borrow<py::buffer>(obj).request();
    if (b.ndim != 1) throw py::value_error("tokens: expected a 1-D array, got " + std::to_string(b.ndim) + " dimensions");
    out.resize(static_cast<std::size_t>(b.shape[0]));
    const auto* base = static_cast<const std::byte*>(b.ptr);
    if (b.itemsize == 4 && b.strides[0] == 4 && (b.format == "i" || b.format == "l")) {  // dense int32: one copy
      if (!out.empty()) std::memcpy(out.data(), base, out.size() * 4);
      return out;
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      const std::byte* p = base + static_cast<std::ptrdiff_t>(i) * b.strides[0];
      if (b.format == py::format_descriptor<std::int32_t>::format() || (b.itemsize == 4 && (b.format == "i" || b.format == "l"))) {
        std::int32_t v;
        std::memcpy(&v, p, 4);
        out[i] = v;
      } else if (b.itemsize == 8 && (b.format == "q" || b.format == "l" || b.format == "Q" || b.format == "L")) {
        std::int64_t v;
        std::memcpy(&v, p, 8);
        if (v < INT32_MIN || v > INT32_MAX) throw py::value_error("tokens: id " + std::to_string(v) + " at " + std::to_string(i) + " does not fit 32 bits");
        out[i] = static_cast<kvortex::token_id>(v);
      } else {
        throw py::type_error("tokens: expected int32 or int64 elements, got format '" + b.format + "'");
      }
    }
    return out;
  }
  for (const auto& v : obj) {
    const auto x = v.cast<long long>();
    if (x < INT32_MIN || x > INT32_MAX) throw py::value_error("tokens: id " + std::to_string(x) + " does not fit 32 bits");
    out.push_back(static_cast<kvortex::token_id>(x));
  }
  return out;
}

// A key salt from bytes or str (UTF-8); None is the empty salt.
std::string salt_of(const py::handle& obj) {
  if (obj.is_none()) return {};
  if (py::isinstance<py::bytes>(obj)) return obj.cast<std::string>();
  if (py::isinstance<py::str>(obj)) return obj.cast<std::string>();
  throw py::type_error("salt: expected bytes, str or None");
}
kvortex::key_salt view_of(const std::string& s) { return {reinterpret_cast<const std::byte*>(s.data()), s.size()}; }

std::vector<std::int32_t> table_of(const py::handle& obj) {
  std::vector<std::int32_t> out;
  if (obj.is_none()) return out;
  for (const auto t : tokens_of(obj)) out.push_back(static_cast<std::int32_t>(t));
  return out;
}

kvortex::transfer_hints hints_of(std::uintptr_t stream, std::uintptr_t event) {
  kvortex::transfer_hints h;
  h.stream = reinterpret_cast<void*>(stream);
  h.wait_event = reinterpret_cast<void*>(event);
  return h;
}

std::vector<kvortex::chunk_key> keys_of(const std::vector<py::bytes>& keys) {
  std::vector<kvortex::chunk_key> out;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const std::string s = keys[i];
    if (s.size() != 32) throw py::value_error("keys[" + std::to_string(i) + "]: a key is 32 bytes, got " + std::to_string(s.size()));
    kvortex::chunk_key k;
    std::memcpy(k.bytes.data(), s.data(), 32);
    out.push_back(k);
  }
  return out;
}

// ---- type-erased engine -------------------------------------------------------------------------

class py_layered {
 public:
  virtual ~py_layered() = default;
  virtual std::size_t tokens() const = 0;
  virtual kvortex::result<void> submit_layer(std::size_t layer, const kvortex::transfer_hints& h) = 0;
  virtual kvortex::result<void> submit_all(const kvortex::transfer_hints& h) = 0;
  virtual kvortex::result<kvortex::transfer_ticket> finish() = 0;
};

class py_engine {
 public:
  virtual ~py_engine() = default;
  virtual const kvortex::engine_config& config() const = 0;
  virtual std::string stack() const = 0;
  virtual kvortex::result<std::size_t> lookup(std::span<const kvortex::token_id>, kvortex::key_salt) = 0;
  virtual kvortex::result<kvortex::tiered_lookup> lookup_tiers(std::span<const kvortex::token_id>, kvortex::key_salt) = 0;
  virtual kvortex::result<kvortex::transfer_ticket> store(std::span<const kvortex::token_id>, const kvortex::kv_layout&,
                                                          std::span<const std::int32_t>, const kvortex::transfer_hints&,
                                                          kvortex::key_salt) = 0;
  virtual kvortex::result<kvortex::transfer_ticket> retrieve(std::span<const kvortex::token_id>, const kvortex::kv_layout&,
                                                             std::span<const std::int32_t>, const kvortex::transfer_hints&,
                                                             kvortex::key_salt) = 0;
  virtual kvortex::result<std::unique_ptr<py_layered>> begin_store(std::span<const kvortex::token_id>, const kvortex::kv_layout&,
                                                                   std::span<const std::int32_t>, kvortex::key_salt) = 0;
  virtual kvortex::result<std::unique_ptr<py_layered>> begin_retrieve(std::span<const kvortex::token_id>,
                                                                      const kvortex::kv_layout&, std::span<const std::int32_t>,
                                                                      kvortex::key_salt) = 0;
  virtual kvortex::result<kvortex::transfer_ticket> prefetch(std::span<const kvortex::token_id>, kvortex::key_salt) = 0;
  virtual kvortex::result<std::vector<kvortex::chunk_key>> chunk_keys(std::span<const kvortex::token_id>, kvortex::key_salt) = 0;
  virtual kvortex::result<void> serve_lookups(kvortex::lookup_server_config) = 0;
  virtual std::vector<kvortex::lookup_server_stats> lookup_server_stats() const = 0;
  virtual kvortex::result<std::size_t> save_blocks(std::span<const kvortex::chunk_key>, std::span<const std::byte* const>,
                                                   std::span<const std::size_t>) = 0;
  virtual kvortex::result<void> load_blocks(std::span<const kvortex::chunk_key>, std::span<std::byte* const>,
                                            std::span<const std::size_t>) = 0;
  virtual kvortex::result<kvortex::block_mask> check_blocks(std::span<const kvortex::chunk_key>) = 0;
  virtual kvortex::engine_stats stats() const = 0;
  virtual void flush() = 0;
  virtual void shutdown() = 0;
};

template <class E>
class layered_of final : public py_layered {
 public:
  explicit layered_of(typename E::layered_transfer t) : t_(std::move(t)) {}
  std::size_t tokens() const override { return t_.tokens(); }
  kvortex::result<void> submit_layer(std::size_t l, const kvortex::transfer_hints& h) override { return t_.submit_layer(l, h); }
  kvortex::result<void> submit_all(const kvortex::transfer_hints& h) override { return t_.submit_all(h); }
  kvortex::result<kvortex::transfer_ticket> finish() override { return t_.finish(); }

 private:
  typename E::layered_transfer t_;
};

// Holds the engine until `shutdown`, which destroys it: its tiers' files, locks and connections
// are let go at once, not whenever Python collects the object. Later calls fail with shut_down.
template <class E>
class engine_of final : public py_engine {
 public:
  engine_of(E e, std::string stack) : cfg_(e.config()), e_(std::move(e)), stack_(std::move(stack)) {}
  const kvortex::engine_config& config() const override { return cfg_; }
  std::string stack() const override { return stack_; }
  kvortex::result<std::size_t> lookup(std::span<const kvortex::token_id> t, kvortex::key_salt s) override {
    if (!e_) return gone("lookup");
    return e_->lookup(t, s);
  }
  kvortex::result<kvortex::tiered_lookup> lookup_tiers(std::span<const kvortex::token_id> t, kvortex::key_salt s) override {
    if (!e_) return gone("lookup");
    return e_->lookup_tiers(t, s);
  }
  kvortex::result<kvortex::transfer_ticket> store(std::span<const kvortex::token_id> t, const kvortex::kv_layout& l,
                                                  std::span<const std::int32_t> b, const kvortex::transfer_hints& h,
                                                  kvortex::key_salt s) override {
    if (!e_) return gone("store");
    return e_->store(t, l, b, h, s);
  }
  kvortex::result<kvortex::transfer_ticket> retrieve(std::span<const kvortex::token_id> t, const kvortex::kv_layout& l,
                                                     std::span<const std::int32_t> b, const kvortex::transfer_hints& h,
                                                     kvortex::key_salt s) override {
    if (!e_) return gone("retrieve");
    return e_->retrieve(t, l, b, h, s);
  }
  kvortex::result<std::unique_ptr<py_layered>> begin_store(std::span<const kvortex::token_id> t, const kvortex::kv_layout& l,
                                                           std::span<const std::int32_t> b, kvortex::key_salt s) override {
    if (!e_) return gone("store");
    auto r = e_->begin_store(t, l, b, s);
    if (!r) return std::unexpected(r.error());
    return std::unique_ptr<py_layered>(std::make_unique<layered_of<E>>(std::move(*r)));
  }
  kvortex::result<std::unique_ptr<py_layered>> begin_retrieve(std::span<const kvortex::token_id> t, const kvortex::kv_layout& l,
                                                              std::span<const std::int32_t> b, kvortex::key_salt s) override {
    if (!e_) return gone("retrieve");
    auto r = e_->begin_retrieve(t, l, b, s);
    if (!r) return std::unexpected(r.error());
    return std::unique_ptr<py_layered>(std::make_unique<layered_of<E>>(std::move(*r)));
  }
  kvortex::result<kvortex::transfer_ticket> prefetch(std::span<const kvortex::token_id> t, kvortex::key_salt s) override {
    if (!e_) return gone("prefetch");
    return e_->prefetch(t, s);
  }
  kvortex::result<std::vector<kvortex::chunk_key>> chunk_keys(std::span<const kvortex::token_id> t, kvortex::key_salt s) override {
    if (!e_) return gone("chunk_keys");
    return e_->chunk_keys(t, s);
  }
  kvortex::result<void> serve_lookups(kvortex::lookup_server_config c) override {
    if (!e_) return gone("serve_lookups");
    E* e = &*e_;  // the servers stop before the engine goes (shutdown, member order)
    auto srv = kvortex::lookup_server::start(std::move(c), [e](std::span<const kvortex::token_id> t, kvortex::key_salt s) { return e->lookup(t, s); });
    if (!srv) return std::unexpected(srv.error());
    servers_.push_back(std::move(*srv));
    return {};
  }
  std::vector<kvortex::lookup_server_stats> lookup_server_stats() const override {
    std::vector<kvortex::lookup_server_stats> out;
    for (const auto& s : servers_) out.push_back(s.stats());
    return out;
  }
  kvortex::result<std::size_t> save_blocks(std::span<const kvortex::chunk_key> k, std::span<const std::byte* const> p,
                                           std::span<const std::size_t> s) override {
    if (!e_) return gone("save_blocks");
    return e_->save_blocks(k, p, s);
  }
  kvortex::result<void> load_blocks(std::span<const kvortex::chunk_key> k, std::span<std::byte* const> p,
                                    std::span<const std::size_t> s) override {
    if (!e_) return gone("load_blocks");
    return e_->load_blocks(k, p, s);
  }
  kvortex::result<kvortex::block_mask> check_blocks(std::span<const kvortex::chunk_key> k) override {
    if (!e_) return gone("check_blocks");
    return e_->check_blocks(k);
  }
  kvortex::engine_stats stats() const override { return e_ ? e_->stats() : kvortex::engine_stats{}; }
  void flush() override {
    if (e_) e_->flush();
  }
  void shutdown() override {
    servers_.clear();
    e_.reset();
  }

 private:
  static std::unexpected<kvortex::error> gone(const char* op) {
    return std::unexpected(kvortex::error{kvortex::errc::shut_down, std::string(op) + ": the engine was shut down"});
  }
  kvortex::engine_config cfg_;
  std::optional<E> e_;
  std::string stack_;
  std::vector<kvortex::lookup_server> servers_;  // last: destroyed (stopped) before the engine
};

// Opens the tiers a deployment names (their namespace digest, when left zero, is the engine's) and
// builds the engine over them.
template <class Stack>
kvortex::result<std::unique_ptr<py_engine>> build_stack(kvortex::deployment_config cfg, const char* base) {
  using namespace kvortex;
  [[maybe_unused]] const auto digest = tier_namespace<sha256_hasher>(cfg.engine);
  if (!digest) return std::unexpected(digest.error());
  [[maybe_unused]] const auto zero = namespace_digest{};
  std::string name = base;
#if defined(KVORTEX_PY_DISK)
  std::optional<disk_tier> disk;
  if (cfg.disk) {
    if (cfg.disk->ns == zero) cfg.disk->ns = *digest;
    auto t = disk_tier::open(*cfg.disk);
    if (!t) return std::unexpected(t.error());
    disk.emplace(std::move(*t));
    name += " + disk";
  }
#else
  if (cfg.disk) return fail(errc::unsupported, "this kvortex was built without xxHash: no disk tier");
#endif
#if defined(KVORTEX_PY_REDIS)
  std::optional<redis_tier> redis;
  if (cfg.redis) {
    if (cfg.redis->ns == zero) cfg.redis->ns = *digest;
    auto t = redis_tier::open(*cfg.redis);
    if (!t) return std::unexpected(t.error());
    redis.emplace(std::move(*t));
    name += " + redis";
  }
#else
  if (cfg.redis) return fail(errc::unsupported, "this kvortex was built without hiredis: no Redis tier");
#endif
  const auto wrap = [&](auto made) -> result<std::unique_ptr<py_engine>> {
    if (!made) return std::unexpected(made.error());
    using E = typename decltype(made)::value_type;
    return std::unique_ptr<py_engine>(std::make_unique<engine_of<E>>(std::move(*made), name));
  };
  using A [[maybe_unused]] = typename Stack::allocator_type;
  using H [[maybe_unused]] = typename Stack::hasher_type;
  using V [[maybe_unused]] = typename Stack::eviction_policy_type;
  using S [[maybe_unused]] = typename Stack::transfer_scheduler_type;
#if defined(KVORTEX_PY_DISK) && defined(KVORTEX_PY_REDIS)
  if (disk && redis)
    return wrap(basic_engine<A, H, V, tiered_backend<cpu_backend, disk_tier, redis_tier>, S>::create(
        cfg.engine, tiered_backend<cpu_backend, disk_tier, redis_tier>(cpu_backend{}, std::move(*disk), std::move(*redis))));
#endif
#if defined(KVORTEX_PY_DISK)
  if (disk)
    return wrap(basic_engine<A, H, V, tiered_backend<cpu_backend, disk_tier>, S>::create(
        cfg.engine, tiered_backend<cpu_backend, disk_tier>(cpu_backend{}, std::move(*disk))));
#endif
#if defined(KVORTEX_PY_REDIS)
  if (redis)
    return wrap(basic_engine<A, H, V, tiered_backend<cpu_backend, redis_tier>, S>::create(
        cfg.engine, tiered_backend<cpu_backend, redis_tier>(cpu_backend{}, std::move(*redis))));
#endif
  return wrap(Stack::create(cfg.engine));
}

std::unique_ptr<py_engine> make_engine(const py::dict& settings, const std::string& stack) {
  kvortex::deployment_config cfg;
  for (const auto& [k, v] : settings) {
    const std::string key = py::str(k);
    std::string value;
    if (py::isinstance<py::bool_>(v)) value = v.cast<bool>() ? "true" : "false";
    else if (py::isinstance<py::list>(v) || py::isinstance<py::tuple>(v)) {
      for (const auto& item : v) value += (value.empty() ? "" : ",") + std::string(py::str(item));
    } else value = py::str(v);
    take(kvortex::apply_setting(cfg, key, value));
  }
  if (auto v = kvortex::validate(cfg); !v) raise(v.error());
  kvortex::result<std::unique_ptr<py_engine>> made = kvortex::fail(
      kvortex::errc::unsupported, "stack '" + stack + "': this build has " +
#if defined(KVORTEX_WITH_CUDA)
                                      "'host' and 'gpu'"
#else
                                      "only 'host' (configured without CUDA)"
#endif
  );
  {
    py::gil_scoped_release nogil;  // opening tiers may wait for a server's connect timeout
    if (stack == "host") made = build_stack<kvortex::host_engine>(std::move(cfg), "host");
#if defined(KVORTEX_WITH_CUDA)
    if (stack == "gpu") made = build_stack<kvortex::engine>(std::move(cfg), "gpu");
#endif
  }
  return take(std::move(made));
}

// ---- layouts ------------------------------------------------------------------------------------

std::vector<std::byte*> ptrs_of(const std::vector<std::uintptr_t>& v) {
  std::vector<std::byte*> out;
  for (auto p : v) out.push_back(reinterpret_cast<std::byte*>(p));
  return out;
}

kvortex::kv_geometry geometry_of(const py::dict& g) {
  kvortex::kv_geometry out;
  for (const auto& [k, v] : g) {
    const std::string key = py::str(k);
    const auto x = v.cast<std::uint32_t>();
    if (key == "num_layers") out.num_layers = x;
    else if (key == "kv_planes") out.kv_planes = x;
    else if (key == "kv_heads") out.kv_heads = x;
    else if (key == "head_dim") out.head_dim = x;
    else if (key == "element_bytes") out.element_bytes = x;
    else throw py::key_error("geometry: unknown key '" + key + "' (num_layers, kv_planes, kv_heads, head_dim, element_bytes)");
  }
  return out;
}

kvortex::kv_layout finish_layout(kvortex::result<kvortex::kv_layout> l, bool device) {
  auto out = take(std::move(l));
  if (device) out.on_device();
  return out;
}

py::dict stats_dict(const kvortex::engine_stats& s) {
  py::dict d;
  d["lookups"] = s.lookups;
  d["hit_chunks"] = s.hit_chunks;
  d["miss_chunks"] = s.miss_chunks;
  d["hit_tokens"] = s.hit_tokens;
  d["queried_tokens"] = s.queried_tokens;
  d["stored_chunks"] = s.stored_chunks;
  d["deduplicated_chunks"] = s.deduplicated_chunks;
  d["rejected_chunks"] = s.rejected_chunks;
  d["replaced_chunks"] = s.replaced_chunks;
  d["retrieved_chunks"] = s.retrieved_chunks;
  d["evictions"] = s.evictions;
  d["bytes_stored"] = s.bytes_stored;
  d["bytes_loaded"] = s.bytes_loaded;
  d["transfer_failures"] = s.transfer_failures;
  d["current_bytes"] = s.current_bytes;
  d["peak_bytes"] = s.peak_bytes;
  d["capacity_bytes"] = s.capacity_bytes;
  d["chunks"] = s.chunks;
  d["demotions_queued"] = s.demotions_queued;
  d["demotions_dropped"] = s.demotions_dropped;
  d["demotion_queue_depth"] = s.demotion_queue_depth;
  d["promotion_timeouts"] = s.promotion_timeouts;
  d["prefetches"] = s.prefetches;
  py::list tiers;
  for (const auto& t : s.tiers) {
    py::dict td;
    td["name"] = t.name;
    td["hits"] = t.tier.hits;
    td["misses"] = t.tier.misses;
    td["writes"] = t.tier.writes;
    td["bytes_read"] = t.tier.bytes_read;
    td["bytes_written"] = t.tier.bytes_written;
    td["errors"] = t.tier.errors();
    td["corrupt_removed"] = t.tier.corrupt_removed;
    td["entries"] = t.tier.entries;
    td["lookup_hit_chunks"] = t.lookup_hit_chunks;
    td["promoted_chunks"] = t.promoted_chunks;
    td["promotion_failures"] = t.promotion_failures;
    td["demoted_chunks"] = t.demoted_chunks;
    td["demotion_failures"] = t.demotion_failures;
    tiers.append(td);
  }
  d["tiers"] = tiers;
  return d;
}

}  // namespace

PYBIND11_MODULE(_kvortex, m) {
  m.doc() = "KVortex: KV-cache offloading engine (C++ core). Use the `kvortex` package.";
  m.attr("__version__") = kvortex::version_string;
  m.attr("has_cuda") =
#if defined(KVORTEX_WITH_CUDA)
      true;
#else
      false;
#endif
  m.attr("has_disk_tier") =
#if defined(KVORTEX_PY_DISK)
      true;
#else
      false;
#endif
  m.attr("has_redis_tier") =
#if defined(KVORTEX_PY_REDIS)
      true;
#else
      false;
#endif

  py::class_<kvortex::kv_layout>(m, "Layout")
      .def_property_readonly("num_layers", &kvortex::kv_layout::num_layers)
      .def_property_readonly("num_blocks", &kvortex::kv_layout::num_blocks)
      .def_property_readonly("block_tokens", &kvortex::kv_layout::block_tokens)
      .def_property_readonly("kind", &kvortex::kv_layout::kind)
      .def_property_readonly("on_device", [](const kvortex::kv_layout& l) { return l.location() == kvortex::memory_location::device; });

  m.def("_flash_attn", [](const std::vector<std::uintptr_t>& p, const py::dict& g, std::size_t nb, std::size_t bt, bool hnd, bool dev) {
    auto ptrs = ptrs_of(p);
    return finish_layout(kvortex::kv_layout::flash_attn(ptrs, geometry_of(g), nb, bt, hnd ? kvortex::kv_order::hnd : kvortex::kv_order::nhd), dev);
  });
  m.def("_flashinfer", [](const std::vector<std::uintptr_t>& p, const py::dict& g, std::size_t nb, std::size_t bt, bool hnd, bool dev) {
    auto ptrs = ptrs_of(p);
    return finish_layout(kvortex::kv_layout::flashinfer(ptrs, geometry_of(g), nb, bt, hnd ? kvortex::kv_order::hnd : kvortex::kv_order::nhd), dev);
  });
  m.def("_mla", [](const std::vector<std::uintptr_t>& p, const py::dict& g, std::size_t nb, std::size_t bt, bool dev) {
    auto ptrs = ptrs_of(p);
    return finish_layout(kvortex::kv_layout::mla(ptrs, geometry_of(g), nb, bt), dev);
  });
  m.def("_cross_layer", [](std::uintptr_t base, const py::dict& g, std::size_t nb, std::size_t bt, bool blocks_outermost, bool dev) {
    return finish_layout(kvortex::kv_layout::cross_layer(reinterpret_cast<std::byte*>(base), geometry_of(g), nb, bt, blocks_outermost), dev);
  });
  m.def("_contiguous", [](const std::vector<std::uintptr_t>& p, const py::dict& g, std::size_t max_tokens, bool dev) {
    auto ptrs = ptrs_of(p);
    return finish_layout(kvortex::kv_layout::contiguous(ptrs, geometry_of(g), max_tokens), dev);
  });
  m.def("_split_kv", [](const std::vector<std::uintptr_t>& k, const std::vector<std::uintptr_t>& v, const py::dict& g, std::size_t nb,
                        std::size_t bt, bool hnd, bool dev) {
    auto keys = ptrs_of(k);
    auto values = ptrs_of(v);
    return finish_layout(kvortex::kv_layout::split_kv(keys, values, geometry_of(g), nb, bt, hnd ? kvortex::kv_order::hnd : kvortex::kv_order::nhd), dev);
  });
  m.def("_strided", [](const std::vector<std::uintptr_t>& p, const py::dict& g, std::size_t nb, std::size_t bt, std::int64_t plane,
                       std::int64_t block, std::int64_t token, std::int64_t head, std::size_t layer_bytes, bool dev) {
    auto ptrs = ptrs_of(p);
    return finish_layout(kvortex::kv_layout::strided(ptrs, geometry_of(g), nb, bt, plane, block, token, head, layer_bytes), dev);
  });

  py::class_<kvortex::transfer_ticket>(m, "Ticket")
      .def("ready", &kvortex::transfer_ticket::ready, "True once the transfer finished; never blocks.")
      .def(
          "wait",
          [](const kvortex::transfer_ticket& t) {
            kvortex::result<std::size_t> r = 0;
            {
              py::gil_scoped_release nogil;
              r = t.wait();
            }
            return take(std::move(r));
          },
          "Blocks (without the GIL) until the transfer finished; returns the tokens (or keys) moved.");

  py::class_<py_layered>(m, "LayeredTransfer")
      .def_property_readonly("tokens", &py_layered::tokens)
      .def(
          "submit_layer",
          [](py_layered& t, std::size_t layer, std::uintptr_t stream, std::uintptr_t event) {
            kvortex::result<void> r;
            {
              py::gil_scoped_release nogil;
              r = t.submit_layer(layer, hints_of(stream, event));
            }
            take(std::move(r));
          },
          py::arg("layer"), py::arg("stream") = 0, py::arg("event") = 0)
      .def(
          "submit_all",
          [](py_layered& t, std::uintptr_t stream, std::uintptr_t event) {
            kvortex::result<void> r;
            {
              py::gil_scoped_release nogil;
              r = t.submit_all(hints_of(stream, event));
            }
            take(std::move(r));
          },
          py::arg("stream") = 0, py::arg("event") = 0)
      .def("finish", [](py_layered& t) {
        kvortex::result<kvortex::transfer_ticket> r = kvortex::transfer_ticket{};
        {
          py::gil_scoped_release nogil;
          r = t.finish();
        }
        return take(std::move(r));
      });

  py::class_<py_engine>(m, "Engine")
      .def(py::init([](const py::dict& settings, const std::string& stack) { return make_engine(settings, stack); }),
           py::arg("settings"), py::arg("stack") = "host")
      .def_property_readonly("stack", &py_engine::stack)
      .def_property_readonly("chunk_tokens", [](const py_engine& e) { return e.config().chunk_tokens; })
      .def_property_readonly("block_tokens", [](const py_engine& e) { return e.config().block_tokens; })
      .def_property_readonly("geometry", [](const py_engine& e) {
        const auto& g = e.config().geometry;
        py::dict d;
        d["num_layers"] = g.num_layers;
        d["kv_planes"] = g.kv_planes;
        d["kv_heads"] = g.kv_heads;
        d["head_dim"] = g.head_dim;
        d["element_bytes"] = g.element_bytes;
        return d;
      })
      .def("lookup", [](py_engine& e, const py::handle& tokens, const py::handle& salt) {
        const auto t = tokens_of(tokens);
        const auto k = salt_of(salt);
        kvortex::result<std::size_t> r = 0;
        {
          py::gil_scoped_release nogil;
          r = e.lookup(t, view_of(k));
        }
        return take(std::move(r));
      }, py::arg("tokens"), py::arg("salt") = py::none())
      .def("lookup_tiers", [](py_engine& e, const py::handle& tokens, const py::handle& salt) {
        const auto t = tokens_of(tokens);
        const auto k = salt_of(salt);
        kvortex::result<kvortex::tiered_lookup> r = kvortex::tiered_lookup{};
        {
          py::gil_scoped_release nogil;
          r = e.lookup_tiers(t, view_of(k));
        }
        const auto w = take(std::move(r));
        py::dict d;
        d["tokens"] = w.tokens;
        d["memory"] = w.memory_tokens;
        for (const auto& h : w.tiers) d[py::str(std::string(h.tier))] = h.tokens;
        return d;
      }, py::arg("tokens"), py::arg("salt") = py::none())
      .def(
          "store",
          [](py_engine& e, const py::handle& tokens, const kvortex::kv_layout& l, const py::handle& table, std::uintptr_t event,
             const py::handle& salt) {
            const auto t = tokens_of(tokens);
            const auto b = table_of(table);
            const auto k = salt_of(salt);
            kvortex::result<kvortex::transfer_ticket> r = kvortex::transfer_ticket{};
            {
              py::gil_scoped_release nogil;
              r = e.store(t, l, b, hints_of(0, event), view_of(k));
            }
            return take(std::move(r));
          },
          py::arg("tokens"), py::arg("layout"), py::arg("block_table") = py::none(), py::arg("event") = 0,
          py::arg("salt") = py::none())
      .def(
          "retrieve",
          [](py_engine& e, const py::handle& tokens, const kvortex::kv_layout& l, const py::handle& table, std::uintptr_t stream,
             const py::handle& salt) {
            const auto t = tokens_of(tokens);
            const auto b = table_of(table);
            const auto k = salt_of(salt);
            kvortex::result<kvortex::transfer_ticket> r = kvortex::transfer_ticket{};
            {
              py::gil_scoped_release nogil;
              r = e.retrieve(t, l, b, hints_of(stream, 0), view_of(k));
            }
            return take(std::move(r));
          },
          py::arg("tokens"), py::arg("layout"), py::arg("block_table") = py::none(), py::arg("stream") = 0,
          py::arg("salt") = py::none())
      .def(
          "begin_store",
          [](py_engine& e, const py::handle& tokens, const kvortex::kv_layout& l, const py::handle& table,
             const py::handle& salt) {
            const auto t = tokens_of(tokens);
            const auto b = table_of(table);
            const auto k = salt_of(salt);
            kvortex::result<std::unique_ptr<py_layered>> r = std::unique_ptr<py_layered>{};
            {
              py::gil_scoped_release nogil;
              r = e.begin_store(t, l, b, view_of(k));
            }
            return take(std::move(r));
          },
          py::arg("tokens"), py::arg("layout"), py::arg("block_table") = py::none(), py::arg("salt") = py::none())
      .def(
          "begin_retrieve",
          [](py_engine& e, const py::handle& tokens, const kvortex::kv_layout& l, const py::handle& table,
             const py::handle& salt) {
            const auto t = tokens_of(tokens);
            const auto b = table_of(table);
            const auto k = salt_of(salt);
            kvortex::result<std::unique_ptr<py_layered>> r = std::unique_ptr<py_layered>{};
            {
              py::gil_scoped_release nogil;
              r = e.begin_retrieve(t, l, b, view_of(k));
            }
            return take(std::move(r));
          },
          py::arg("tokens"), py::arg("layout"), py::arg("block_table") = py::none(), py::arg("salt") = py::none())
      .def("prefetch", [](py_engine& e, const py::handle& tokens, const py::handle& salt) {
        const auto t = tokens_of(tokens);
        const auto k = salt_of(salt);
        return take(e.prefetch(t, view_of(k)));
      }, py::arg("tokens"), py::arg("salt") = py::none())
      .def("chunk_keys", [](py_engine& e, const py::handle& tokens, const py::handle& salt) {
        const auto t = tokens_of(tokens);
        const auto s = salt_of(salt);
        py::list out;
        for (const auto& k : take(e.chunk_keys(t, view_of(s))))
          out.append(py::bytes(reinterpret_cast<const char*>(k.bytes.data()), k.bytes.size()));
        return out;
      }, py::arg("tokens"), py::arg("salt") = py::none())
      .def("serve_lookups", [](py_engine& e, const std::string& path, std::size_t max_clients, std::size_t max_tokens) {
        kvortex::lookup_server_config c;
        c.path = path;
        c.max_clients = max_clients;
        c.max_tokens = max_tokens;
        take(e.serve_lookups(std::move(c)));
      }, py::arg("path"), py::arg("max_clients") = 64, py::arg("max_tokens") = std::size_t{1} << 21,
         "Answers lookup(tokens, salt) for other processes on the Unix socket `path` (mode 0600), on a thread of "
         "its own that never takes the GIL. Stopped by shutdown().")
      .def("lookup_server_stats", [](const py_engine& e) {
        py::list out;
        for (const auto& s : e.lookup_server_stats()) {
          py::dict d;
          d["queries"] = s.queries;
          d["failed_lookups"] = s.failed_lookups;
          d["rejected_frames"] = s.rejected_frames;
          d["clients_accepted"] = s.clients_accepted;
          d["clients_refused"] = s.clients_refused;
          out.append(d);
        }
        return out;
      })
      .def("save_blocks", [](py_engine& e, const std::vector<py::bytes>& keys, const std::vector<std::uintptr_t>& ptrs,
                             const std::vector<std::size_t>& sizes) {
        const auto k = keys_of(keys);
        std::vector<const std::byte*> p;
        for (auto x : ptrs) p.push_back(reinterpret_cast<const std::byte*>(x));
        kvortex::result<std::size_t> r = 0;
        {
          py::gil_scoped_release nogil;
          r = e.save_blocks(k, p, sizes);
        }
        return take(std::move(r));
      })
      .def("load_blocks", [](py_engine& e, const std::vector<py::bytes>& keys, const std::vector<std::uintptr_t>& ptrs,
                             const std::vector<std::size_t>& sizes) {
        const auto k = keys_of(keys);
        std::vector<std::byte*> p;
        for (auto x : ptrs) p.push_back(reinterpret_cast<std::byte*>(x));
        kvortex::result<void> r;
        {
          py::gil_scoped_release nogil;
          r = e.load_blocks(k, p, sizes);
        }
        take(std::move(r));
      })
      .def("check_blocks", [](py_engine& e, const std::vector<py::bytes>& keys) {
        const auto k = keys_of(keys);
        const auto mask = take(e.check_blocks(k));
        std::vector<bool> out(mask.size());
        for (std::size_t i = 0; i < out.size(); ++i) out[i] = mask.test(i);
        return out;
      })
      .def("stats", [](const py_engine& e) { return stats_dict(e.stats()); })
      .def(
          "prometheus",
          [](const py_engine& e, const std::string& prefix) { return take(kvortex::to_prometheus(e.stats(), prefix)); },
          py::arg("prefix") = "kvortex")
      .def("flush", [](py_engine& e) {
        py::gil_scoped_release nogil;
        e.flush();
      })
      .def("shutdown", [](py_engine& e) {
        py::gil_scoped_release nogil;
        e.shutdown();
      });

  py::class_<kvortex::lookup_client>(m, "LookupClient")
      .def(py::init([](const std::vector<std::string>& paths, double backoff_ms, double send_timeout_ms) {
             kvortex::lookup_client_config c;
             c.paths = paths;
             c.reconnect_backoff = std::chrono::milliseconds(static_cast<std::int64_t>(backoff_ms));
             c.send_timeout = std::chrono::milliseconds(static_cast<std::int64_t>(send_timeout_ms));
             return take(kvortex::lookup_client::create(std::move(c)));
           }),
           py::arg("paths"), py::arg("reconnect_backoff_ms") = 200.0, py::arg("send_timeout_ms") = 20.0)
      .def("send", [](kvortex::lookup_client& c, const py::handle& tokens, const py::handle& salt) {
        const auto t = tokens_of(tokens);
        const auto k = salt_of(salt);
        return take(c.send(t, view_of(k)));
      }, py::arg("tokens"), py::arg("salt") = py::none())
      .def("poll", [](kvortex::lookup_client& c, std::uint64_t id, double wait_us) -> py::object {
        kvortex::result<std::optional<std::size_t>> r = std::optional<std::size_t>{};
        {
          py::gil_scoped_release nogil;
          r = c.poll(id, std::chrono::microseconds(static_cast<std::int64_t>(wait_us)));
        }
        const auto v = take(std::move(r));
        if (!v) return py::none();
        return py::int_(*v);
      }, py::arg("id"), py::arg("wait_us") = 0.0)
      .def("cancel", &kvortex::lookup_client::cancel, py::arg("id"))
      .def_property_readonly("pending", &kvortex::lookup_client::pending_queries)
      .def("stats", [](const kvortex::lookup_client& c) {
        py::dict d;
        d["queries"] = c.stats().queries;
        d["answers"] = c.stats().answers;
        d["unreachable"] = c.stats().unreachable;
        d["reconnects"] = c.stats().reconnects;
        return d;
      });

  m.def("_set_error_type", [](py::object t) {
    error_type = t.release().ptr();
  });
  m.def(
      "log_to_stderr",
      [](const std::string& level) {
        kvortex::log_level l = kvortex::log_level::warning;
        if (level == "debug") l = kvortex::log_level::debug;
        else if (level == "info") l = kvortex::log_level::info;
        else if (level == "warning") l = kvortex::log_level::warning;
        else if (level == "error") l = kvortex::log_level::error;
        else if (level == "off") l = kvortex::log_level::off;
        else throw py::value_error("log level: debug, info, warning, error or off, got '" + level + "'");
        kvortex::set_log_sink(l == kvortex::log_level::off ? kvortex::log_sink{} : kvortex::stderr_log_sink(), l);
      },
      py::arg("level") = "warning", "Sends KVortex's log records at `level` and above to stderr ('off': silent).");
}
