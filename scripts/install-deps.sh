#!/usr/bin/env bash
# Installs the Debian 12 packages that building, testing, benchmarking and the examples need.
# Idempotent: installs only what is missing, and runs apt-get update only then.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git
  libssl-dev libnuma-dev libxxhash-dev
  doctest-dev libbenchmark-dev
  clang-19  # the header check compiles every public header with clang++-19 too
  libfuzzer-19-dev libclang-rt-19-dev  # libFuzzer targets and clang's sanitizer runtimes
  redis-server libhiredis-dev  # the Redis tier and the redis-server processes its tests start
  liburing-dev  # the disk tier's io_uring engine (optional: without it the tier uses pread/pwrite)
  libtomlplusplus-dev  # TOML deployment files (kvortex/deployment_config.hpp; optional: without it only settings and the environment)
  python3-dev python3-pybind11 python3-numpy python3-pytest python3-pip  # the Python package and its tests
)

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${pkg}")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=()
if [[ "$(id -u)" -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"
