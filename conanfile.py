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
    # The optional parts, as in the CMake package: one component (and target) each.
    options = {"with_numa": [True, False], "with_xxhash": [True, False],
               "with_hiredis": [True, False], "with_liburing": [True, False]}
    default_options = {"with_numa": False, "with_xxhash": True, "with_hiredis": False, "with_liburing": False}
    exports_sources = "include/*", "cmake/*", "CMakeLists.txt", "LICENSE"
    no_copy_source = True

    def layout(self):
        basic_layout(self, src_folder=".")

    def config_options(self):
        if self.settings.os != "Linux":
            del self.options.with_liburing

    def requirements(self):
        self.requires("openssl/[>=3 <4]")
        if self.options.with_xxhash:
            self.requires("xxhash/[>=0.8 <0.9]")
        if self.options.with_hiredis:
            self.requires("hiredis/[>=1.0 <2]")
        if self.options.get_safe("with_liburing"):
            self.requires("liburing/[>=2.0 <3]")

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
        # Targets as in the installed CMake package: kvortex::kvortex is the core, each optional
        # part a component kvortex::<part> on top of it. The package-wide target (all components)
        # gets another name so that it does not hide the core.
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.set_property("cmake_file_name", "kvortex")
        self.cpp_info.set_property("cmake_target_name", "kvortex::kvortex_all_components")
        self.cpp_info.set_property("pkg_config_name", "kvortex-all-components")

        def part(name, target, pc_name):
            c = self.cpp_info.components[name]
            c.bindirs = []
            c.libdirs = []
            c.set_property("cmake_target_name", target)
            c.set_property("pkg_config_name", pc_name)
            if name != "core":
                c.requires = ["core"]
            return c

        core = part("core", "kvortex::kvortex", "kvortex")
        core.requires = ["openssl::crypto"]
        if self.settings.os in ("Linux", "FreeBSD"):
            core.system_libs = ["pthread"]
        if self.options.with_xxhash:
            xxh = part("xxhash", "kvortex::xxhash", "kvortex-xxhash")
            xxh.requires.append("xxhash::xxhash")
            xxh.defines = ["KVORTEX_WITH_XXHASH=1"]
        if self.options.with_numa:
            numa = part("numa", "kvortex::numa", "kvortex-numa")
            numa.system_libs = ["numa"]  # libnuma comes from the system (Debian: libnuma-dev)
            numa.defines = ["KVORTEX_WITH_NUMA=1"]
        for option, name, dep, define in (("with_liburing", "uring", "liburing::liburing", "KVORTEX_WITH_LIBURING=1"),
                                          ("with_hiredis", "redis", "hiredis::hiredis", "KVORTEX_WITH_HIREDIS=1")):
            if self.options.get_safe(option):
                c = part(name, "kvortex::" + name, "kvortex-" + name)
                c.requires.append(dep)
                if self.options.with_xxhash:
                    c.requires.append("xxhash")
                c.defines = [define]
