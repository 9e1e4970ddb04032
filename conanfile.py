import os

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.files import copy
from conan.tools.layout import basic_layout

required_conan_version = ">=2.0"


class KvortexConan(ConanFile):
    name = "kvortex"
    version = "0.1.0"
    license = "Apache-2.0"
    description = "Header-only C++23 KV-cache offloading library for LLM inference engines"
    topics = ("llm", "inference", "kv-cache", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    options = {"with_numa": [True, False], "with_xxhash": [True, False]}
    default_options = {"with_numa": False, "with_xxhash": True}
    exports_sources = "include/*", "cmake/*", "CMakeLists.txt", "LICENSE"
    no_copy_source = True

    def layout(self):
        basic_layout(self, src_folder=".")

    def requirements(self):
        self.requires("openssl/[>=3 <4]")
        if self.options.with_xxhash:
            self.requires("xxhash/[>=0.8 <0.9]")

    def package_id(self):
        self.info.clear()

    def validate(self):
        if self.settings.compiler.get_safe("cppstd"):
            check_min_cppstd(self, 23)

    def package(self):
        copy(self, "LICENSE", self.source_folder, os.path.join(self.package_folder, "licenses"))
        copy(self, "*.hpp", os.path.join(self.source_folder, "include"),
             os.path.join(self.package_folder, "include"))

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.set_property("cmake_file_name", "kvortex")
        self.cpp_info.set_property("cmake_target_name", "kvortex::kvortex")
        self.cpp_info.set_property("pkg_config_name", "kvortex")
        self.cpp_info.requires = ["openssl::crypto"]
        if self.settings.os in ("Linux", "FreeBSD"):
            self.cpp_info.system_libs = ["pthread"]
        if self.options.with_numa:
            # libnuma comes from the system (Debian: libnuma-dev).
            self.cpp_info.system_libs.append("numa")
            self.cpp_info.defines.append("KVORTEX_WITH_NUMA=1")
        if self.options.with_xxhash:
            self.cpp_info.requires.append("xxhash::xxhash")
            self.cpp_info.defines.append("KVORTEX_WITH_XXHASH=1")
