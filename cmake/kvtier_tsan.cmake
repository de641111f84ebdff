# The tsan build's own part: every executable of the build (tests, tools, benchmarks) gets
# cmake/tsan_suppressions.cpp, TSan's default suppressions for the uninstrumented librocksdb. Other
# builds never see the file. Called from the top CMakeLists.txt once every folder is added.
function(kvtier_add_tsan_suppressions dir)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  foreach(target ${targets})
    get_target_property(type ${target} TYPE)
    if(type STREQUAL "EXECUTABLE")
      target_sources(${target} PRIVATE ${PROJECT_SOURCE_DIR}/cmake/tsan_suppressions.cpp)
    endif()
  endforeach()
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(subdir ${subdirs})
    kvtier_add_tsan_suppressions(${subdir})
  endforeach()
endfunction()
