#!/usr/bin/env bash
# Builds and runs the consumer projects under tests/cmake_* against this source tree:
#   1. configure + install KVortex with every optional part found here (a consumer build: tests,
#      benchmarks and examples off; its cache must mention no doctest, benchmark or pybind11), and
#      a second install without CUDA
#   2. find_package(kvortex), no COMPONENTS (cmake_import): a host-only consumer that configures
#      with libnuma and the CUDA Toolkit hidden (CMAKE_DISABLE_FIND_PACKAGE_*) and pkg-config
#      seeing no package, builds, runs, and links libcrypto and none of the parts' libraries
#   3. find_package(kvortex COMPONENTS redis) (cmake_components): the Redis tier, against a
#      redis-server started here when there is one; links hiredis and not numa, cudart, liburing
#   4. COMPONENTS cuda: gpu_offload links kvortex::cuda (when this install has it); against the
#      install without CUDA, COMPONENTS cuda fails to configure naming "cuda", OPTIONAL_COMPONENTS
#      cuda configures with kvortex_cuda_FOUND false; an unknown component and redis with
#      pkg-config seeing nothing fail naming the component
#   5. add_subdirectory and FetchContent of the source tree (cmake_add_subdirectory,
#      cmake_fetchcontent; cmake_components: the same part target names, the Redis tier)
#   6. pkg-config --cflags --libs kvortex (the core), and kvortex-redis when installed
# Environment: CXX (compiler), KVORTEX_CONSUMER_WORKDIR (kept, instead of a removed temp dir),
#              KVORTEX_CMAKE_ARGS (extra arguments for every configure step; not -G: the
#              script uses the Makefile generator),
#              KVORTEX_REDIS_SERVER (redis-server binary; else PATH; none: no round trip).
set -euo pipefail

src="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${KVORTEX_CONSUMER_WORKDIR:-}" ]]; then
  work="${KVORTEX_CONSUMER_WORKDIR}"
  rm -rf "${work}"
  mkdir -p "${work}"
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/kvortex-consumers.XXXXXX")"
fi
redis_pid=""
cleanup() {
  if [[ -n "${redis_pid}" ]]; then kill "${redis_pid}" 2>/dev/null || true; fi
  if [[ -z "${KVORTEX_CONSUMER_WORKDIR:-}" ]]; then rm -rf "${work}"; fi
}
trap cleanup EXIT
prefix="${work}/prefix"
prefix_nocuda="${work}/prefix-nocuda"
jobs="$(nproc 2>/dev/null || echo 2)"
# The link-line checks read the Makefile generator's link.txt.
export CMAKE_GENERATOR="Unix Makefiles"
read -r -a extra <<<"${KVORTEX_CMAKE_ARGS:-}"
common=(-DCMAKE_BUILD_TYPE=Release "${extra[@]}")
consumer_build=(-DKVORTEX_BUILD_TESTS=OFF -DKVORTEX_BUILD_BENCHMARKS=OFF -DKVORTEX_BUILD_EXAMPLES=OFF)
empty_pc="${work}/no-pkgconfig-packages"
mkdir -p "${empty_pc}"

# A library on a link line, as a path or as -l.
lib_crypto='libcrypto\.|-lcrypto( |$)'
lib_hiredis='libhiredis\.|-lhiredis( |$)'
lib_uring='liburing\.|-luring( |$)'
lib_numa='libnuma\.|-lnuma( |$)'
lib_cudart='libcudart\.|-lcudart( |$)'
lib_nvrtc='libnvrtc\.|-lnvrtc( |$)'

step() { printf '\n=== %s\n' "$*"; }
fail() {
  echo "FAILED: $*" >&2
  exit 1
}
# must_link <link.txt> <regex>... / must_not_link <link.txt> <regex>...
must_link() {
  local f="$1" re
  shift
  for re in "$@"; do grep -qE -- "${re}" "${f}" || fail "${f} should link ${re}: $(cat "${f}")"; done
}
must_not_link() {
  local f="$1" re
  shift
  for re in "$@"; do
    if grep -qE -- "${re}" "${f}"; then fail "${f} should not link ${re}: $(cat "${f}")"; fi
  done
}
# configure_fails <name> <expected text> <cmake args>...: the configure must fail and say <expected text>.
configure_fails() {
  local name="$1" expected="$2"
  shift 2
  step "consumer ${name}: configure must fail naming ${expected}"
  if cmake -S "${src}/tests/cmake_components" -B "${work}/${name}" "${common[@]}" "$@" >"${work}/${name}.log" 2>&1; then
    cat "${work}/${name}.log"
    fail "${name}: configure succeeded"
  fi
  if ! tr -s ' \n' ' ' <"${work}/${name}.log" | grep -qF "${expected}"; then
    cat "${work}/${name}.log"
    fail "${name}: the error does not say: ${expected}"
  fi
  grep -A12 'Reason given by package' "${work}/${name}.log" || true
}

step "install kvortex to ${prefix} (a consumer build: no tests, benchmarks, examples)"
cmake -S "${src}" -B "${work}/kvortex-build" "${common[@]}" "${consumer_build[@]}" -DCMAKE_INSTALL_PREFIX="${prefix}"
if grep -E '^(doctest_DIR|KVORTEX_DOCTEST_INCLUDE_DIR|benchmark_DIR|pybind11_DIR|Python3_EXECUTABLE)[:=]' \
  "${work}/kvortex-build/CMakeCache.txt"; then
  fail "the consumer build looked for a test, benchmark or Python dependency (cache entries above)"
fi
cmake --build "${work}/kvortex-build"
cmake --install "${work}/kvortex-build"
cmake_dir="${prefix}/$(cd "${prefix}" && find . -name kvortexConfig.cmake -printf '%h' -quit)"
parts=()
for p in xxhash numa cuda uring redis; do
  if [[ -f "${cmake_dir}/kvortex-${p}-targets.cmake" ]]; then parts+=("${p}"); fi
done
echo "installed components: ${parts[*]:-none}"
has_part() { [[ " ${parts[*]:-} " == *" $1 "* ]]; }
nocuda_parts=()
for p in "${parts[@]}"; do [[ "${p}" == cuda ]] || nocuda_parts+=("${p}"); done
cmake_list() { local IFS=';'; echo "$*"; }
# The checks below are only as strong as the install: it must have every part this machine can build.
if pkg-config --exists hiredis 2>/dev/null && [[ -f /usr/include/xxhash.h ]] && ! has_part redis; then fail "hiredis is here but the install has no redis component"; fi
if pkg-config --exists liburing 2>/dev/null && ! has_part uring; then fail "liburing is here but the install has no uring component"; fi
if [[ -f /usr/include/numa.h ]] && ! has_part numa; then fail "libnuma is here but the install has no numa component"; fi

step "install kvortex without CUDA to ${prefix_nocuda}"
cmake -S "${src}" -B "${work}/kvortex-build-nocuda" "${common[@]}" "${consumer_build[@]}" \
  -DCMAKE_INSTALL_PREFIX="${prefix_nocuda}" -DKVORTEX_WITH_CUDA=OFF >"${work}/kvortex-build-nocuda.log"
cmake --install "${work}/kvortex-build-nocuda" >>"${work}/kvortex-build-nocuda.log"

redis_endpoint=""
redis_bin="${KVORTEX_REDIS_SERVER:-$(command -v redis-server || true)}"
if [[ -n "${redis_bin}" ]] && has_part redis; then
  step "redis-server for the Redis tier consumers"
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then break; fi
  done
  mkdir -p "${work}/redis"
  "${redis_bin}" --port "${port}" --bind 127.0.0.1 --save '' --appendonly no --dir "${work}/redis" \
    >"${work}/redis/log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then redis_endpoint="127.0.0.1:${port}"; break; fi
    kill -0 "${redis_pid}" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n "${redis_endpoint}" ]] || { cat "${work}/redis/log"; fail "redis-server did not start on port ${port}"; }
  echo "redis-server (pid ${redis_pid}) on ${redis_endpoint}"
fi

# build_consumer <name> <source dir> <cmake args>...
build_consumer() {
  local name="$1" dir="$2"
  shift 2
  step "consumer ${name}"
  cmake -S "${src}/tests/${dir}" -B "${work}/${name}" "${common[@]}" "$@"
  cmake --build "${work}/${name}" -j "${jobs}"
}
link_of() { echo "${work}/$1/CMakeFiles/$2.dir/link.txt"; }
run_redis_consumer() {
  # shellcheck disable=SC2086 # an empty endpoint is no argument
  "${work}/$1/redis_consumer" ${redis_endpoint}
}

# 2. The host-only consumer: no optional dependency can be found, none is looked up.
step "host-only consumer: libnuma and the CUDA Toolkit hidden, pkg-config sees no package"
PKG_CONFIG_LIBDIR="${empty_pc}" PKG_CONFIG_PATH="" build_consumer cmake_import cmake_import \
  -DCMAKE_PREFIX_PATH="${prefix}" -DCMAKE_DISABLE_FIND_PACKAGE_NUMA=ON -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON
"${work}/cmake_import/consumer"
must_link "$(link_of cmake_import consumer)" "${lib_crypto}"
must_not_link "$(link_of cmake_import consumer)" "${lib_hiredis}" "${lib_uring}" "${lib_numa}" "${lib_cudart}" "${lib_nvrtc}"
if grep -q 'KVORTEX_WITH_' "${work}/cmake_import/CMakeFiles/consumer.dir/flags.make"; then
  fail "the host-only consumer got a part's definition: $(grep DEFINES "${work}/cmake_import/CMakeFiles/consumer.dir/flags.make")"
fi

# 3. The Redis tier, and nothing else.
if has_part redis; then
  build_consumer components-redis cmake_components -DCMAKE_PREFIX_PATH="${prefix}" -DCONSUMER_COMPONENTS=redis \
    -DCONSUMER_EXPECT_TARGETS="redis;xxhash" -DCONSUMER_EXPECT_NO_TARGETS="cuda;numa;uring"
  must_link "$(link_of components-redis redis_consumer)" "${lib_hiredis}" "${lib_crypto}"
  must_not_link "$(link_of components-redis redis_consumer)" "${lib_numa}" "${lib_cudart}" "${lib_nvrtc}" "${lib_uring}"
  run_redis_consumer components-redis
  PKG_CONFIG_LIBDIR="${empty_pc}" PKG_CONFIG_PATH="" configure_fails components-redis-no-hiredis \
    'component "redis" needs hiredis' -DCMAKE_PREFIX_PATH="${prefix}" -DCONSUMER_COMPONENTS=redis
fi

# 4. CUDA: present in the first install where this machine has the toolkit, absent in the second.
if has_part cuda; then
  build_consumer components-cuda cmake_components -DCMAKE_PREFIX_PATH="${prefix}" -DCONSUMER_COMPONENTS=cuda \
    -DCONSUMER_EXPECT_TARGETS=cuda -DCONSUMER_EXPECT_NO_TARGETS="numa;redis;uring;xxhash"
  must_link "$(link_of components-cuda gpu_consumer)" "${lib_cudart}"
  must_not_link "$(link_of components-cuda gpu_consumer)" "${lib_hiredis}" "${lib_uring}" "${lib_numa}" '(^| )-lcuda( |$)|/libcuda\.so'
  "${work}/components-cuda/gpu_consumer"
fi
configure_fails components-cuda-missing 'component "cuda" is not in this install' \
  -DCMAKE_PREFIX_PATH="${prefix_nocuda}" -DCONSUMER_COMPONENTS="numa;cuda"
configure_fails components-unknown '"tpu" is not a kvortex component' \
  -DCMAKE_PREFIX_PATH="${prefix_nocuda}" -DCONSUMER_COMPONENTS=tpu
# Every part as optional: what the install has is found, cuda is not, and that is no error.
build_consumer components-optional cmake_components -DCMAKE_PREFIX_PATH="${prefix_nocuda}" \
  -DCONSUMER_OPTIONAL_COMPONENTS="cuda;numa;redis;uring;xxhash" \
  -DCONSUMER_EXPECT_TARGETS="$(cmake_list "${nocuda_parts[@]}")" -DCONSUMER_EXPECT_NO_TARGETS=cuda
if has_part redis; then run_redis_consumer components-optional; fi
# Optional parts whose dependencies are not found here are skipped, not errors.
step "consumer components-optional-no-pkgconfig: optional redis and uring, pkg-config sees no package"
PKG_CONFIG_LIBDIR="${empty_pc}" PKG_CONFIG_PATH="" cmake -S "${src}/tests/cmake_components" \
  -B "${work}/components-optional-no-pkgconfig" "${common[@]}" -DCMAKE_PREFIX_PATH="${prefix_nocuda}" \
  -DCONSUMER_OPTIONAL_COMPONENTS="redis;uring" -DCONSUMER_EXPECT_NO_TARGETS="redis;uring"

# 5. The source tree in another project.
build_consumer cmake_add_subdirectory cmake_add_subdirectory -DKVORTEX_SOURCE_DIR="${src}"
"${work}/cmake_add_subdirectory/consumer"
build_consumer cmake_fetchcontent cmake_fetchcontent -DKVORTEX_SOURCE_DIR="${src}"
"${work}/cmake_fetchcontent/consumer"
if has_part redis; then
  build_consumer components-add-subdirectory cmake_components -DCONSUMER_USE=add_subdirectory \
    -DKVORTEX_SOURCE_DIR="${src}" -DKVORTEX_WITH_CUDA=OFF \
    -DCONSUMER_EXPECT_TARGETS="$(cmake_list "${nocuda_parts[@]}")" \
    -DCONSUMER_EXPECT_NO_TARGETS=cuda
  must_not_link "$(link_of components-add-subdirectory redis_consumer)" "${lib_cudart}"
  run_redis_consumer components-add-subdirectory
fi

# 6. pkg-config.
step "consumer pkg-config"
pc="$(find "${prefix}" -name kvortex.pc -print -quit)"
if [[ -z "${pc}" ]]; then
  fail "kvortex.pc was not installed"
fi
pcdir="$(dirname "${pc}")"
cflags="$(PKG_CONFIG_PATH="${pcdir}" pkg-config --cflags kvortex)"
libs="$(PKG_CONFIG_PATH="${pcdir}" pkg-config --libs kvortex)"
echo "kvortex cflags: ${cflags}"
echo "kvortex libs:   ${libs}"
for re in KVORTEX_WITH_ "${lib_hiredis}" "${lib_uring}" "${lib_numa}" "${lib_cudart}" "${lib_nvrtc}"; do
  if grep -qE -- "${re}" <<<"${cflags} ${libs}"; then fail "kvortex.pc should be the core only (${re})"; fi
done
# shellcheck disable=SC2086 # word splitting of the pkg-config flags is intended
"${CXX:-c++}" -O2 ${cflags} "${src}/tests/consumer_main.cpp" -o "${work}/pkgconfig-consumer" ${libs}
"${work}/pkgconfig-consumer"
if [[ -f "${pcdir}/kvortex-redis.pc" ]]; then
  cflags="$(PKG_CONFIG_PATH="${pcdir}" pkg-config --cflags kvortex-redis)"
  libs="$(PKG_CONFIG_PATH="${pcdir}" pkg-config --libs kvortex-redis)"
  echo "kvortex-redis cflags: ${cflags}"
  echo "kvortex-redis libs:   ${libs}"
  # shellcheck disable=SC2086
  "${CXX:-c++}" -O2 ${cflags} "${src}/tests/cmake_components/redis_consumer.cpp" -o "${work}/pkgconfig-redis-consumer" ${libs}
  # shellcheck disable=SC2086
  "${work}/pkgconfig-redis-consumer" ${redis_endpoint}
fi

step "all consumer builds passed"
