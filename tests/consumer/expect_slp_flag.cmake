# Checks that a consumer's compile of switchyard code carries -fno-tree-slp-vectorize exactly when
# it should (g++ < 13 on x86, SWITCHYARD_GCC12_NO_SLP_WORKAROUND not turned off).
#
# include()d by a consumer project: switchyard_expect_slp_flag(<target> <source file name>) adds a
# POST_BUILD step that reads the project's compile_commands.json (CMAKE_EXPORT_COMPILE_COMMANDS
# must be ON) and fails the build if the flag is missing or present against expectation.
# Run with -P by that step: -DCOMMANDS=<json> -DSOURCE=<file name> -DEXPECT=ON|OFF.
set(_sy_slp_flag "-fno-tree-slp-vectorize")

if(CMAKE_SCRIPT_MODE_FILE)
  file(READ "${COMMANDS}" json)
  string(JSON count LENGTH "${json}")
  set(found_source OFF)
  math(EXPR last "${count} - 1")
  foreach(i RANGE ${last})
    string(JSON file GET "${json}" ${i} file)
    get_filename_component(name "${file}" NAME)
    if(NOT name STREQUAL SOURCE)
      continue()
    endif()
    set(found_source ON)
    string(JSON command GET "${json}" ${i} command)
    string(FIND "${command}" "${_sy_slp_flag}" at)
    if(EXPECT AND at EQUAL -1)
      message(FATAL_ERROR "${SOURCE} is compiled without ${_sy_slp_flag}, which switchyard's "
                          "target should add for this compiler:\n${command}")
    elseif(NOT EXPECT AND NOT at EQUAL -1)
      message(FATAL_ERROR "${SOURCE} is compiled with ${_sy_slp_flag}, which switchyard's "
                          "target should not add here:\n${command}")
    endif()
  endforeach()
  if(NOT found_source)
    message(FATAL_ERROR "${SOURCE} is not in ${COMMANDS}")
  endif()
  message(STATUS "${SOURCE}: ${_sy_slp_flag} present = ${EXPECT}, as expected")
  return()
endif()

function(switchyard_expect_slp_flag target source)
  set(expect OFF)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13
     AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|x86|i[3-6]86)$"
     AND (SWITCHYARD_GCC12_NO_SLP_WORKAROUND OR NOT DEFINED SWITCHYARD_GCC12_NO_SLP_WORKAROUND))
    set(expect ON)
  endif()
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND ${CMAKE_COMMAND} -DCOMMANDS=${CMAKE_BINARY_DIR}/compile_commands.json
      -DSOURCE=${source} -DEXPECT=${expect} -P ${CMAKE_CURRENT_FUNCTION_LIST_FILE}
    VERBATIM)
endfunction()
