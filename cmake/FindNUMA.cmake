# FindNUMA
# --------
# Finds libnuma (Debian: libnuma-dev).
#
# Imported target:
#   NUMA::NUMA     the library with its include directory
# Result variables:
#   NUMA_FOUND, NUMA_INCLUDE_DIRS, NUMA_LIBRARIES
# Cache variables:
#   NUMA_INCLUDE_DIR, NUMA_LIBRARY

find_path(NUMA_INCLUDE_DIR NAMES numa.h)
find_library(NUMA_LIBRARY NAMES numa)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NUMA REQUIRED_VARS NUMA_LIBRARY NUMA_INCLUDE_DIR)

if(NUMA_FOUND)
  set(NUMA_INCLUDE_DIRS "${NUMA_INCLUDE_DIR}")
  set(NUMA_LIBRARIES "${NUMA_LIBRARY}")
  if(NOT TARGET NUMA::NUMA)
    add_library(NUMA::NUMA UNKNOWN IMPORTED)
    set_target_properties(NUMA::NUMA PROPERTIES
      IMPORTED_LOCATION "${NUMA_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${NUMA_INCLUDE_DIR}")
  endif()
endif()

mark_as_advanced(NUMA_INCLUDE_DIR NUMA_LIBRARY)
