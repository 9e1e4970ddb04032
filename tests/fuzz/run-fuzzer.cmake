# Runs one fuzz target for ctest: cmake -DFUZZER=<exe> -DCORPUS=<dir> -DREGRESSIONS=<dir>
#   -DWORKDIR=<dir> -DINPUT_TIMEOUT=<s> -DMODE=replay|fuzz [-DSECONDS=<s>] -P run-fuzzer.cmake
# replay: every seed and regression input once. fuzz: SECONDS of fuzzing (the environment's
# KVORTEX_FUZZ_SECONDS wins) from a fresh copy of the seeds; a crash fails the test.
cmake_minimum_required(VERSION 3.25)

if(MODE STREQUAL "replay")
  file(GLOB inputs LIST_DIRECTORIES false "${CORPUS}/*" "${REGRESSIONS}/*")
  list(FILTER inputs EXCLUDE REGEX "/(README[^/]*|\\.[^/]*)$")
  if(NOT inputs)
    message(STATUS "no inputs in ${CORPUS} or ${REGRESSIONS}")
    return()
  endif()
  list(LENGTH inputs n)
  message(STATUS "replaying ${n} inputs")
  execute_process(COMMAND "${FUZZER}" -timeout=${INPUT_TIMEOUT} ${inputs} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "a committed input fails (exit ${rc}); see the output above")
  endif()
  return()
endif()

if(DEFINED ENV{KVORTEX_FUZZ_SECONDS} AND NOT "$ENV{KVORTEX_FUZZ_SECONDS}" STREQUAL "")
  set(SECONDS "$ENV{KVORTEX_FUZZ_SECONDS}")
endif()
file(REMOVE_RECURSE "${WORKDIR}")
file(MAKE_DIRECTORY "${WORKDIR}/corpus" "${WORKDIR}/artifacts")
file(GLOB seeds LIST_DIRECTORIES false "${CORPUS}/*")
list(FILTER seeds EXCLUDE REGEX "/(README[^/]*|\\.[^/]*)$")
if(seeds)
  file(COPY ${seeds} DESTINATION "${WORKDIR}/corpus")
endif()
execute_process(
  COMMAND "${FUZZER}" -max_total_time=${SECONDS} -timeout=${INPUT_TIMEOUT} -rss_limit_mb=2048
          -print_final_stats=1 -artifact_prefix=${WORKDIR}/artifacts/ "${WORKDIR}/corpus"
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  file(GLOB found "${WORKDIR}/artifacts/*")
  message(FATAL_ERROR "the fuzzer failed (exit ${rc}); inputs: ${found}\n"
                      "Minimize one with: ${FUZZER} -minimize_crash=1 -max_total_time=60 <input>, and keep it under ${REGRESSIONS}/")
endif()
