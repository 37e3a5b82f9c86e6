include(CMakePackageConfigHelpers)
set(SWITCHYARD_CMAKE_DIR ${CMAKE_INSTALL_DATADIR}/cmake/switchyard)

install(TARGETS switchyard EXPORT switchyardTargets)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/switchyard DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT switchyardTargets NAMESPACE switchyard:: DESTINATION ${SWITCHYARD_CMAKE_DIR})
# switchyard::mpi in a file of its own, loaded only by find_package(switchyard COMPONENTS mpi).
if(SWITCHYARD_HAS_MPI)
  install(TARGETS switchyard_mpi EXPORT switchyardMpiTargets)
  install(EXPORT switchyardMpiTargets NAMESPACE switchyard:: DESTINATION ${SWITCHYARD_CMAKE_DIR})
endif()

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/switchyardConfig.cmake.in
  ${PROJECT_BINARY_DIR}/switchyardConfig.cmake INSTALL_DESTINATION ${SWITCHYARD_CMAKE_DIR})
# 0.x: minor versions may break the API, so only the same minor is compatible.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/switchyardConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/switchyardConfig.cmake
              ${PROJECT_BINARY_DIR}/switchyardConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/switchyardXsimdShim.cmake
              ${PROJECT_SOURCE_DIR}/cmake/switchyardGcc12Workaround.cmake
        DESTINATION ${SWITCHYARD_CMAKE_DIR})

# pkg-config users get -fopenmp when this build uses OpenMP (the plain flag, which g++ and clang++
# both take; FindOpenMP's flags are those of the compiler that configured this build).
if(SWITCHYARD_USES_OPENMP)
  set(SWITCHYARD_PC_OPENMP " -fopenmp")
else()
  set(SWITCHYARD_PC_OPENMP "")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/switchyard.pc.in ${PROJECT_BINARY_DIR}/switchyard.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/switchyard.pc DESTINATION ${CMAKE_INSTALL_DATADIR}/pkgconfig)
