// A consumer of the Redis tier through kvortex::redis alone. Opening the tier against a loopback
// port where nothing listens must fail with errc::backend_failure; given "host:port" of a live
// redis-server, a 100000-byte chunk must come back byte for byte and an unknown key must miss.
// Exits nonzero on any failure.
#include <kvortex/tiers/redis_tier.hpp>

#if !defined(KVORTEX_WITH_HIREDIS) || !defined(KVORTEX_WITH_XXHASH)
#error "kvortex::redis must define KVORTEX_WITH_HIREDIS and, through kvortex::xxhash, KVORTEX_WITH_XXHASH"
#endif

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

using namespace std::chrono_literals;

// A loopback port nothing listens on: one the kernel hands out, closed again at once.
std::uint16_t closed_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  std::uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

kvortex::redis_tier_config config(kvortex::redis_endpoint ep) {
  kvortex::redis_tier_config cfg;
  cfg.servers = {std::move(ep)};
  cfg.key_prefix = "kvx-consumer:";
  cfg.connect_timeout = 2000ms;
  cfg.command_timeout = 2000ms;
  cfg.require_connection = true;
  return cfg;
}

kvortex::chunk_key key(std::uint8_t seed) {
  kvortex::chunk_key k;
  for (std::size_t i = 0; i < k.bytes.size(); ++i) k.bytes[i] = static_cast<std::byte>(seed * 31 + i);
  return k;
}

}  // namespace

int main(int argc, char** argv) {
  const std::uint16_t port = closed_port();
  if (port == 0) {
    std::fprintf(stderr, "no loopback port to test against\n");
    return 1;
  }
  auto refused = kvortex::redis_tier::open(config({.host = "127.0.0.1", .port = port}));
  if (refused || refused.error().code != kvortex::errc::backend_failure) {
    std::fprintf(stderr, "opening against closed port %u should fail with backend_failure\n", unsigned{port});
    return 1;
  }
  std::printf("redis tier against a closed port: %s\n", refused.error().what().c_str());

  if (argc < 2) {
    std::puts("kvortex redis consumer: OK (no server given, round trip not run)");
    return 0;
  }
  auto ep = kvortex::redis_endpoint::parse(argv[1]);
  if (!ep) {
    std::fprintf(stderr, "bad endpoint: %s\n", ep.error().what().c_str());
    return 1;
  }
  auto tier = kvortex::redis_tier::open(config(*ep));
  if (!tier) {
    std::fprintf(stderr, "redis_tier::open(%s) failed: %s\n", argv[1], tier.error().what().c_str());
    return 1;
  }
  std::vector<std::byte> chunk(100000);
  for (std::size_t i = 0; i < chunk.size(); ++i) chunk[i] = static_cast<std::byte>((i * 131 + 7) & 0xFF);
  if (auto w = tier->put(key(1), chunk); !w) {
    std::fprintf(stderr, "put failed: %s\n", w.error().what().c_str());
    return 1;
  }
  std::vector<std::byte> back(chunk.size());
  auto r = tier->get(key(1), back);
  if (!r || *r != chunk.size() || back != chunk) {
    std::fprintf(stderr, "get did not return the stored chunk: %s\n", r ? "bytes differ" : r.error().what().c_str());
    return 1;
  }
  auto miss = tier->get(key(2), back);
  if (miss || miss.error().code != kvortex::errc::not_found) {
    std::fprintf(stderr, "a key never stored should miss with not_found\n");
    return 1;
  }
  std::printf("kvortex redis consumer: OK (%zu bytes through %s)\n", chunk.size(), argv[1]);
  return 0;
}
