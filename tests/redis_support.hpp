#pragma once
// Real redis-server processes for the redis suite and the Redis benchmark: each in its own
// temporary directory, on a free loopback port, without persistence unless asked
// (--save '' --appendonly no). A server dies with its owner: the destructor kills it, and the
// child asks the kernel for SIGKILL when the test process dies (PR_SET_PDEATHSIG), so a crashed
// or killed test leaves no server behind. `redis_cluster` builds a Redis Cluster by hand
// (ADDSLOTSRANGE, SET-CONFIG-EPOCH, MEET, REPLICATE) and waits until every node agrees.
//
// redis-server comes from $KVORTEX_REDIS_SERVER, else PATH (Debian: apt-get install redis-server).
// Failures to set up throw std::runtime_error (doctest reports them with the server's log tail).

#include <hiredis/hiredis.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <arpa/inet.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <kvortex/detail/redis_protocol.hpp>

namespace kvr {

using namespace std::chrono_literals;

// Writing to a server that was just killed must not kill the test with SIGPIPE.
inline void ignore_sigpipe() {
  static const bool done = [] {
    ::signal(SIGPIPE, SIG_IGN);
    return true;
  }();
  (void)done;
}

inline std::string redis_server_binary() {
  if (const char* e = std::getenv("KVORTEX_REDIS_SERVER"); e != nullptr && *e != '\0') return e;
  const char* path = std::getenv("PATH");
  std::stringstream ss(path != nullptr ? path : "/usr/bin:/bin");
  for (std::string dir; std::getline(ss, dir, ':');) {
    const std::string p = dir + "/redis-server";
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return {};
}

inline bool port_free(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// Ports below the ephemeral range (32768+), with port + 10000 (the cluster bus) free as well.
inline int pick_port() {
  static std::mt19937 rng(static_cast<unsigned>(::getpid()) * 2654435761u ^
                          static_cast<unsigned>(std::chrono::steady_clock::now().time_since_epoch().count()));
  for (int i = 0; i < 1000; ++i) {
    const int p = 11000 + static_cast<int>(rng() % 11000);
    if (port_free(p) && port_free(p + 10000)) return p;
  }
  throw std::runtime_error("no free loopback port pair found");
}

struct temp_dir {
  temp_dir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/kvortex-redis-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string path;
};

struct reply_deleter {
  void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

inline std::string reply_text(const redisReply* r) {
  if (r == nullptr) return "(no reply)";
  switch (r->type) {
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR: return std::string(r->str, r->len);
    case REDIS_REPLY_INTEGER: return std::to_string(r->integer);
    case REDIS_REPLY_NIL: return "(nil)";
    case REDIS_REPLY_ARRAY: return "(array of " + std::to_string(r->elements) + ")";
    default: return "(?)";
  }
}

// A blocking client for administration, one connection per call (survives server restarts).
struct admin_client {
  int port{0};
  std::string password;
  int database{0};  // SELECTed before the command

  [[nodiscard]] reply_ptr command(const std::vector<std::string>& args, std::chrono::milliseconds timeout = 5000ms) const {
    ignore_sigpipe();
    timeval tv{static_cast<time_t>(timeout.count() / 1000), static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
    redisContext* c = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (c == nullptr) return nullptr;
    std::unique_ptr<redisContext, void (*)(redisContext*)> guard(c, redisFree);
    if (c->err != 0) return nullptr;
    redisSetTimeout(c, tv);
    if (!password.empty()) {
      reply_ptr a(static_cast<redisReply*>(redisCommand(c, "AUTH %b", password.data(), password.size())));
      if (!a || a->type == REDIS_REPLY_ERROR) return nullptr;
    }
    if (database != 0) {
      reply_ptr a(static_cast<redisReply*>(redisCommand(c, "SELECT %d", database)));
      if (!a || a->type == REDIS_REPLY_ERROR) return nullptr;
    }
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    return reply_ptr(static_cast<redisReply*>(redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data())));
  }

  // The reply as text; throws when there is none or it is an error.
  std::string must(const std::vector<std::string>& args) const {
    auto r = command(args);
    if (!r) throw std::runtime_error("redis 127.0.0.1:" + std::to_string(port) + ": no reply to " + args.front());
    if (r->type == REDIS_REPLY_ERROR)
      throw std::runtime_error("redis 127.0.0.1:" + std::to_string(port) + ": " + args.front() + " failed: " + reply_text(r.get()));
    return reply_text(r.get());
  }

  // One "field:value" line of INFO <section>; empty when absent.
  std::string info(const std::string& section, const std::string& field) const { return field_of({"INFO", section}, field); }
  // One "field:value" line of CLUSTER INFO.
  std::string info_cluster(const std::string& field) const { return field_of({"CLUSTER", "INFO"}, field); }

 private:
  std::string field_of(const std::vector<std::string>& args, const std::string& field) const {
    auto r = command(args);
    if (!r || (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_STATUS)) return {};
    std::stringstream ss(std::string(r->str, r->len));
    for (std::string line; std::getline(ss, line);) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind(field + ":", 0) == 0) return line.substr(field.size() + 1);
    }
    return {};
  }
};

struct server_options {
  std::vector<std::string> args;  // extra "--name", "value" pairs
  bool cluster{false};
  std::string admin_password;     // what the admin client authenticates with
  int port{0};                    // 0: a free one
};

class redis_server {
 public:
  explicit redis_server(server_options o = {}) : opts_(std::move(o)) {
    ignore_sigpipe();
    binary_ = redis_server_binary();
    if (binary_.empty())
      throw std::runtime_error("redis-server not found: apt-get install redis-server, or set KVORTEX_REDIS_SERVER");
    for (int attempt = 0;; ++attempt) {
      port_ = opts_.port != 0 ? opts_.port : pick_port();
      if (launch()) return;
      if (attempt >= 5) throw std::runtime_error("redis-server did not start on port " + std::to_string(port_) + ":\n" + log_tail());
    }
  }
  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;
  ~redis_server() {
    if (pid_ > 0) {
      ::kill(pid_, SIGCONT);
      ::kill(pid_, SIGKILL);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
  }

  [[nodiscard]] int port() const noexcept { return port_; }
  [[nodiscard]] kvortex::redis_endpoint endpoint() const { return {"127.0.0.1", static_cast<std::uint16_t>(port_)}; }
  [[nodiscard]] const std::string& dir() const noexcept { return dir_.path; }
  [[nodiscard]] admin_client admin(int database = 0) const { return {port_, opts_.admin_password, database}; }
  [[nodiscard]] bool running() const noexcept { return pid_ > 0; }
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

  // SIGKILL, then reap.
  void kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);
    ::kill(pid_, SIGKILL);
    int st = 0;
    ::waitpid(pid_, &st, 0);
    pid_ = -1;
  }
  // Starts it again on the same port and directory (data is gone unless persistence was asked).
  void restart() {
    kill();
    for (int attempt = 0; attempt < 50; ++attempt) {
      if (launch()) return;
      std::this_thread::sleep_for(100ms);  // the port may linger for a moment
    }
    throw std::runtime_error("redis-server did not restart on port " + std::to_string(port_) + ":\n" + log_tail());
  }
  void pause() const { ::kill(pid_, SIGSTOP); }
  void resume() const { ::kill(pid_, SIGCONT); }

  [[nodiscard]] std::string log_tail() const {
    std::ifstream f(dir_.path + "/redis.log");
    std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return all.size() > 3000 ? all.substr(all.size() - 3000) : all;
  }

 private:
  bool launch() {
    std::vector<std::string> args = {binary_, "--port", std::to_string(port_), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", dir_.path, "--daemonize", "no",
                                      "--logfile", dir_.path + "/redis.log"};
    if (opts_.cluster) {
      for (const char* a : {"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"})
        args.emplace_back(a);
      std::error_code ec;
      std::filesystem::remove(dir_.path + "/nodes.conf", ec);  // a restart joins as a new node
    }
    args.insert(args.end(), opts_.args.begin(), opts_.args.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const std::string log = dir_.path + "/redis.out";
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {  // only async-signal-safe calls until exec
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pid_ = pid;
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < until) {
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {  // exited: the port was taken, or a bad option
        pid_ = -1;
        return false;
      }
      auto r = admin().command({"PING"}, 500ms);
      if (r && (r->type == REDIS_REPLY_STATUS || r->type == REDIS_REPLY_ERROR)) return true;  // NOAUTH counts: it is up
      std::this_thread::sleep_for(20ms);
    }
    kill();
    return false;
  }

  server_options opts_;
  std::string binary_;
  temp_dir dir_;
  int port_{0};
  pid_t pid_{-1};
};

// A Redis Cluster of `masters` masters (slots split evenly) and `replicas` replicas per master.
class redis_cluster {
 public:
  explicit redis_cluster(int masters = 3, int replicas = 0, std::vector<std::string> extra = {})
      : masters_(masters), replicas_(replicas) {
    const int n = masters * (1 + replicas);
    for (int i = 0; i < n; ++i) {
      server_options o;
      o.cluster = true;
      o.args = extra;
      // Replicas may fail over however stale (the tests write, WAIT, then fail over).
      o.args.insert(o.args.end(), {"--cluster-replica-validity-factor", "0"});
      nodes_.push_back(std::make_unique<redis_server>(o));
    }
    for (int i = 0; i < n; ++i) ids_.push_back(nodes_[static_cast<std::size_t>(i)]->admin().must({"CLUSTER", "MYID"}));
    for (int m = 0; m < masters; ++m) {
      const int lo = static_cast<int>(kvortex::detail::redis_cluster_slots) * m / masters;
      const int hi = static_cast<int>(kvortex::detail::redis_cluster_slots) * (m + 1) / masters - 1;
      node(m).admin().must({"CLUSTER", "ADDSLOTSRANGE", std::to_string(lo), std::to_string(hi)});
    }
    for (int i = 0; i < n; ++i) node(i).admin().must({"CLUSTER", "SET-CONFIG-EPOCH", std::to_string(i + 1)});
    for (int i = 1; i < n; ++i) node(0).admin().must({"CLUSTER", "MEET", "127.0.0.1", std::to_string(node(i).port())});
    wait_until("every node knows every other", [&] {
      for (int i = 0; i < n; ++i)
        if (node(i).admin().info_cluster("cluster_known_nodes") != std::to_string(n)) return false;
      return true;
    });
    for (int m = 0; m < masters; ++m)
      for (int r = 0; r < replicas; ++r) replica(m, r).admin().must({"CLUSTER", "REPLICATE", id(m)});
    wait_stable();
  }

  [[nodiscard]] int masters() const noexcept { return masters_; }
  [[nodiscard]] int size() const noexcept { return static_cast<int>(nodes_.size()); }
  [[nodiscard]] redis_server& node(int i) { return *nodes_.at(static_cast<std::size_t>(i)); }
  [[nodiscard]] redis_server& replica(int master, int r) { return node(masters_ + master * replicas_ + r); }
  [[nodiscard]] const std::string& id(int i) const { return ids_.at(static_cast<std::size_t>(i)); }

  [[nodiscard]] std::vector<kvortex::redis_endpoint> seeds() const {
    std::vector<kvortex::redis_endpoint> v;
    for (const auto& n : nodes_) v.push_back(n->endpoint());
    return v;
  }

  // The node serving `slot`, by node index, as node `asked` sees it (-1: none).
  int owner_of(int slot, int asked = -1) {
    for (int i = 0; i < size(); ++i) {
      if (asked >= 0 && i != asked) continue;
      if (!node(i).running()) continue;
      auto r = node(i).admin().command({"CLUSTER", "SLOTS"});
      if (!r || r->type != REDIS_REPLY_ARRAY) continue;
      for (std::size_t e = 0; e < r->elements; ++e) {
        const redisReply* range = r->element[e];
        if (range->elements < 3) continue;
        if (slot < range->element[0]->integer || slot > range->element[1]->integer) continue;
        const long long port = range->element[2]->element[1]->integer;
        for (int j = 0; j < size(); ++j)
          if (node(j).port() == port) return j;
      }
      return -1;
    }
    return -1;
  }

  // Every running node reports cluster_state:ok, all slots assigned, and every replica's link up.
  void wait_stable(std::chrono::milliseconds limit = 30000ms) {
    wait_until("the cluster is stable", [&] {
      for (int i = 0; i < size(); ++i) {
        if (!node(i).running()) continue;
        const auto a = node(i).admin();
        if (a.info_cluster("cluster_state") != "ok" || a.info_cluster("cluster_slots_assigned") != "16384") return false;
        if (a.info("replication", "role") == "slave" && a.info("replication", "master_link_status") != "up") return false;
      }
      return true;
    }, limit);
  }

  static void wait_until(const std::string& what, const std::function<bool()>& ok, std::chrono::milliseconds limit = 30000ms) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (!ok()) {
      if (std::chrono::steady_clock::now() > until) throw std::runtime_error("redis cluster: timed out waiting until " + what);
      std::this_thread::sleep_for(50ms);
    }
  }

 private:
  int masters_, replicas_;
  std::vector<std::unique_ptr<redis_server>> nodes_;
  std::vector<std::string> ids_;
};

}  // namespace kvr
