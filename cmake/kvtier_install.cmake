# What `cmake --install` puts where (GNUInstallDirs), and the Debian package (`cpack -G DEB`).
#   include/kvtier/*.h                   the public headers (standard library only)
#   lib/libkvtier_client.so.<v>          the thin client, C and C++ API (soname libkvtier_client.so.0)
#   lib/libkvtier_client.a               the same objects as one static archive
#   lib/cmake/kvtier/                    find_package(kvtier): kvtier::client, kvtier::client_static
#   lib/pkgconfig/kvtier.pc              pkg-config kvtier
#   bin/kvtierd, bin/kvtier              the daemon and the command line
#   lib/systemd/system/kvtierd.service   (the Debian package only) kvtierd as user kvtier
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/api/include/kvtier
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT dev FILES_MATCHING PATTERN "*.h")
install(TARGETS kvtier_client_shared
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime NAMELINK_COMPONENT dev)
install(FILES ${PROJECT_BINARY_DIR}/api/client/bundle/libkvtier_client.a
        DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev)
install(TARGETS kvtierd kvtier RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT runtime)

# The package files find the installed tree relative to themselves, so a tree installed under one
# prefix and moved (or installed with `cmake --install --prefix`) still works.
set(KVTIER_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/kvtier)
set(KVTIER_PKGCONFIG_DIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
file(RELATIVE_PATH KVTIER_CMAKE_TO_PREFIX /_/${KVTIER_CMAKE_DIR} /_)
file(RELATIVE_PATH KVTIER_PC_TO_PREFIX /_/${KVTIER_PKGCONFIG_DIR} /_)
string(REGEX REPLACE "/$" "" KVTIER_CMAKE_TO_PREFIX "${KVTIER_CMAKE_TO_PREFIX}")
string(REGEX REPLACE "/$" "" KVTIER_PC_TO_PREFIX "${KVTIER_PC_TO_PREFIX}")
# What a static link adds to libkvtier_client.a (a shared link needs none of it).
set(KVTIER_PC_LIBS_PRIVATE "-lspdlog -lfmt -lxxhash")
if(KVTIER_HAVE_CUDA)
  string(APPEND KVTIER_PC_LIBS_PRIVATE " -L${CUDAToolkit_LIBRARY_DIR} -lcudart_static -lrt -ldl")
endif()
string(APPEND KVTIER_PC_LIBS_PRIVATE " -lpthread -lstdc++ -lm")

set(KVTIER_CONFIG_CUDA_NOTE "")
if(KVTIER_HAVE_CUDA)
  set(KVTIER_CONFIG_CUDA_NOTE ", the CUDA runtime")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/kvtierConfig.cmake.in
               ${PROJECT_BINARY_DIR}/package/kvtierConfig.cmake @ONLY)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/package/kvtierConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
configure_file(${PROJECT_SOURCE_DIR}/cmake/kvtier.pc.in ${PROJECT_BINARY_DIR}/package/kvtier.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/package/kvtierConfig.cmake
              ${PROJECT_BINARY_DIR}/package/kvtierConfigVersion.cmake
        DESTINATION ${KVTIER_CMAKE_DIR} COMPONENT dev)
install(FILES ${PROJECT_BINARY_DIR}/package/kvtier.pc DESTINATION ${KVTIER_PKGCONFIG_DIR} COMPONENT dev)

# ---- the Debian package: kvtier_<version>_amd64.deb ------------------------------------------
# One package holding everything above plus kvtierd's systemd unit; its maintainer scripts add the
# system user kvtier and start the service (packaging/debian/). Build it with
#   cmake --build --preset default --target package   (or: cd build/default && cpack -G DEB)
install(FILES ${PROJECT_SOURCE_DIR}/packaging/kvtierd.service
        DESTINATION lib/systemd/system COMPONENT runtime)
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME kvtier)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "kvtier developers <kvtier@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "hierarchical KV-cache storage tier for LLM serving (kvtierd, client library)")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # kvtier_<version>_<arch>.deb
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_STRIP_FILES TRUE)
# dpkg-shlibdeps works out the library packages. The CUDA runtime is linked statically
# (cudart_static), so the package needs a CUDA driver only where a GPU is used, not the toolkit.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA ${PROJECT_SOURCE_DIR}/packaging/debian/postinst
                                       ${PROJECT_SOURCE_DIR}/packaging/debian/prerm
                                       ${PROJECT_SOURCE_DIR}/packaging/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
include(CPack)
