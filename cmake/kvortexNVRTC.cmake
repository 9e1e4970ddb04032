# Creates the imported target kvortex::nvrtc for NVRTC, the CUDA runtime compiler, after
# find_package(CUDAToolkit). CUDA::nvrtc is not used because it links libcuda (the driver), and
# a program linked to libcuda directly cannot start on a machine without a GPU driver.

if(NOT TARGET kvortex::nvrtc)
  find_library(KVORTEX_NVRTC_LIBRARY
    NAMES nvrtc
    HINTS "${CUDAToolkit_LIBRARY_DIR}" "${CUDAToolkit_LIBRARY_ROOT}"
    PATH_SUFFIXES lib64 lib lib/x64)
  mark_as_advanced(KVORTEX_NVRTC_LIBRARY)
  if(KVORTEX_NVRTC_LIBRARY)
    add_library(kvortex::nvrtc UNKNOWN IMPORTED)
    set_target_properties(kvortex::nvrtc PROPERTIES
      IMPORTED_LOCATION "${KVORTEX_NVRTC_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${CUDAToolkit_INCLUDE_DIRS}")
  endif()
endif()
