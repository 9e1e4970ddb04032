// Fuzz target: the deployment configuration's readers (kvortex/deployment_config.hpp). The first
// byte picks the reader, the rest is its input:
//   even: a TOML document (apply_config_text);
//   odd:  lines of `key=value` (apply_setting), or with bit 1 set, `NAME=value` environment
//         entries (apply_config_env).
// Checks: no crash, hang or leak; every error has a message, and a rejected setting names its key
// and leaves the configuration unchanged; an accepted setting reads back (config_value) as a
// value that sets the same configuration again; whatever configuration results, its
// to_config_text reads back to the same text; validate() answers without crashing.

#include <kvortex/deployment_config.hpp>

#include "fuzz_support.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace {

using kvortex::deployment_config;

void check_text_round_trip(const deployment_config& cfg) {
  const std::string text = kvortex::to_config_text(cfg);
  deployment_config back;
  auto r = kvortex::apply_config_text(back, text, "round-trip");
  KVFUZZ_CHECK(r.has_value(), "to_config_text does not read back: " + r.error().message + "\n" + text);
  KVFUZZ_CHECK(kvortex::to_config_text(back) == text, "to_config_text reads back to another configuration:\n" + text);
}

void check_settings(std::string_view input) {
  deployment_config cfg;
  for (std::size_t pos = 0; pos <= input.size();) {
    const auto nl = std::min(input.size(), input.find('\n', pos));
    const auto line = input.substr(pos, nl - pos);
    pos = nl + 1;
    const auto eq = line.find('=');
    if (eq == std::string_view::npos) continue;
    const auto key = line.substr(0, eq), value = line.substr(eq + 1);
    const std::string before = kvortex::to_config_text(cfg);
    auto r = kvortex::apply_setting(cfg, key, value);
    if (!r) {
      kvfuzz::check_error(r.error(), "apply_setting");
      KVFUZZ_CHECK(r.error().code == kvortex::errc::invalid_config, "apply_setting failed with " + r.error().what());
      KVFUZZ_CHECK(r.error().message.find("\"" + std::string(key) + "\"") != std::string::npos,
                   "the error does not name the key: " + r.error().message);
      KVFUZZ_CHECK(kvortex::to_config_text(cfg) == before, "a rejected setting changed the configuration");
      continue;
    }
    auto v = kvortex::config_value(cfg, key);
    KVFUZZ_CHECK(v.has_value(), "an accepted key has no value: " + v.error().message);
    const std::string after = kvortex::to_config_text(cfg);
    deployment_config again = cfg;
    auto r2 = kvortex::apply_setting(again, key, *v);
    KVFUZZ_CHECK(r2.has_value(), "config_value's text is refused: " + *v);
    KVFUZZ_CHECK(kvortex::to_config_text(again) == after, "config_value's text sets another value: " + *v);
  }
  check_text_round_trip(cfg);
  if (auto ok = kvortex::validate(cfg); !ok) kvfuzz::check_error(ok.error(), "validate");
}

void check_environment(std::string_view input) {
  std::vector<std::string> entries;
  for (std::size_t pos = 0; pos <= input.size();) {
    const auto nl = std::min(input.size(), input.find('\n', pos));
    entries.emplace_back(input.substr(pos, nl - pos));
    pos = nl + 1;
  }
  std::vector<const char*> env;
  for (const auto& e : entries) env.push_back(e.c_str());
  deployment_config cfg;
  auto r = kvortex::apply_config_env(cfg, env);
  if (!r) {
    kvfuzz::check_error(r.error(), "apply_config_env");
    KVFUZZ_CHECK(r.error().message.starts_with("environment variable "), "the error does not name the variable: " + r.error().message);
  }
  check_text_round_trip(cfg);
}

void check_document(std::string_view input) {
  deployment_config cfg;
  auto r = kvortex::apply_config_text(cfg, input, "fuzz.toml");
  if (!r) {
    kvfuzz::check_error(r.error(), "apply_config_text");
    KVFUZZ_CHECK(r.error().message.starts_with("fuzz.toml"), "the error does not name the source: " + r.error().message);
    return;
  }
  check_text_round_trip(cfg);
  if (auto ok = kvortex::validate(cfg); !ok) kvfuzz::check_error(ok.error(), "validate");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t mode = data[0];
  // A heap copy of exactly the input's size, so ASan sees any read past its end.
  const std::vector<char> bytes(data + 1, data + size);
  const std::string_view input(bytes.data(), bytes.size());
  if ((mode & 1) == 0) check_document(input);
  else if ((mode & 2) == 0) check_settings(input);
  else check_environment(input);
  return 0;
}
