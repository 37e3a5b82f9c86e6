# switchyard_gcc12_slp_workaround(<target> [BUILD_INTERFACE]): the gcc 12 workaround switchyard
# hands to its consumers (option SWITCHYARD_GCC12_NO_SLP_WORKAROUND, ON by default).
#
# g++ 12.2 (Debian 12) miscompiles with AVX-512 targets: its SLP (basic-block) vectoriser turned
# `std::vector<std::int64_t> w{2, 2, 0, 0}` into {2, 2, 2, 2} in one of our tests. switchyard's
# code is compiled in the consumer's own translation units, so the consumer's compile needs
# -fno-tree-slp-vectorize. CMake cannot tell which instruction set a target's flags select
# (-march=native depends on the machine that builds), so every C++ compile with g++ < 13 on x86
# gets it. It turns off only the SLP pass (loops are still vectorised), and switchyard's kernels
# vectorise explicitly with xsimd. The generator expression is evaluated for the consuming
# target: its compiler, not the one switchyard was installed with.
function(switchyard_gcc12_slp_workaround target)
  if(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|x86|i[3-6]86)$")
    return()
  endif()
  set(flag "$<$<AND:$<COMPILE_LANG_AND_ID:CXX,GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-fno-tree-slp-vectorize>")
  if(ARGV1 STREQUAL "BUILD_INTERFACE")
    set(flag "$<BUILD_INTERFACE:${flag}>")
  endif()
  get_target_property(options ${target} INTERFACE_COMPILE_OPTIONS)
  if(NOT flag IN_LIST options)  # find_package may run more than once
    set_property(TARGET ${target} APPEND PROPERTY INTERFACE_COMPILE_OPTIONS "${flag}")
  endif()
endfunction()
