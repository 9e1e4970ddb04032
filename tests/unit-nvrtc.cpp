// The transfer kernels' source compiles with NVRTC for sm_80 and sm_90; no GPU needed.

#if defined(KVORTEX_WITH_CUDA) && defined(KVORTEX_WITH_NVRTC)

#include <doctest/doctest.h>

#include <kvortex/detail/nvrtc_program.hpp>
#include <kvortex/detail/transfer_kernels.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>

using namespace kvortex::detail;

TEST_CASE("nvrtc: the transfer kernels compile to non-empty cubins for sm_80 and sm_90") {
  for (int arch : {80, 90}) {
    CAPTURE(arch);
    auto cubin = nvrtc::compile_cubin(transfer_kernels_source, "kvortex_transfer.cu", arch);
    REQUIRE_MESSAGE(cubin.has_value(), (cubin ? "" : cubin.error().what()));
    CHECK(cubin->size() > 1000);
    // A cubin is an ELF file.
    CHECK(std::string(cubin->data() + 1, 3) == "ELF");
  }
}

TEST_CASE("nvrtc: architectures map to the best supported cubin target") {
  CHECK(nvrtc::pick_arch(9, 0).value() == 90);
  CHECK(nvrtc::pick_arch(8, 6).value() == 86);
  CHECK_FALSE(nvrtc::pick_arch(1, 0).has_value());
}

TEST_CASE("nvrtc: compile errors come back as kvortex errors with the log") {
  auto r = nvrtc::compile_cubin("this is not CUDA", "bad.cu", 90);
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().code == kvortex::errc::unsupported);
  CHECK(r.error().message.find("nvrtcCompileProgram") != std::string::npos);
}

TEST_CASE("nvrtc: the cubin cache writes once and reads back the same bytes") {
  const auto dir = std::filesystem::temp_directory_path() / ("kvortex-nvrtc-test-" + std::to_string(::getpid()));
  ::setenv("KVORTEX_CACHE_DIR", dir.c_str(), 1);
  auto path = nvrtc::cache_path(transfer_kernels_source, 90);
  REQUIRE(path.has_value());
  CHECK(path->parent_path() == dir);
  auto first = nvrtc::cached_cubin(transfer_kernels_source, "kvortex_transfer.cu", 90);
  REQUIRE(first.has_value());
  CHECK(std::filesystem::exists(*path));
  auto second = nvrtc::cached_cubin(transfer_kernels_source, "kvortex_transfer.cu", 90);
  REQUIRE(second.has_value());
  CHECK(*first == *second);
  // Another architecture is another file.
  CHECK(nvrtc::cache_path(transfer_kernels_source, 80).value() != *path);
  ::unsetenv("KVORTEX_CACHE_DIR");
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

#endif
