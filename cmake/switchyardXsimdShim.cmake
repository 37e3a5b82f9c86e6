# Provides the imported target xsimd::xsimd.
# Debian's xsimd 8.1 package exports a target `xsimd` that links a non-existent
# library `xtl`; we take only its include directories. Newer xsimd releases
# export xsimd::xsimd themselves, and then this file does nothing.
if(NOT TARGET xsimd::xsimd)
  find_package(xsimd REQUIRED)
  if(TARGET xsimd)
    get_target_property(_switchyard_xsimd_inc xsimd INTERFACE_INCLUDE_DIRECTORIES)
  else()
    find_path(_switchyard_xsimd_inc xsimd/xsimd.hpp REQUIRED)
  endif()
  add_library(xsimd::xsimd INTERFACE IMPORTED)
  set_target_properties(xsimd::xsimd PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_switchyard_xsimd_inc}")
endif()
