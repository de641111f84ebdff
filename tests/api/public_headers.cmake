# The public headers stand alone: run as `cmake -DCXX=... -DCC=... -DINCLUDE_DIR=api/include
# -DWORK_DIR=... -P public_headers.cmake` (ctest: public_headers).
#   1. every #include in api/include/kvtier/ names another public header or a standard library
#      header (C++20's, or C's for kvtier.h) — not spdlog, xxHash, CUDA or a kvtier source folder;
#   2. each header alone, and all of them together, compile as C++20 with only -I api/include,
#      warnings as errors;
#   3. kvtier.h alone compiles as C11 (-pedantic), and as C++.
cmake_minimum_required(VERSION 3.25)
foreach(v CXX CC INCLUDE_DIR WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "public_headers.cmake: -D${v}=... is required")
  endif()
endforeach()

set(std_cxx algorithm any array atomic barrier bit bitset cassert cctype cerrno cfloat charconv chrono
    cinttypes climits cmath compare complex concepts condition_variable coroutine csignal cstdarg
    cstddef cstdint cstdio cstdlib cstring ctime cwchar deque exception execution expected filesystem
    format forward_list functional future initializer_list iomanip ios iosfwd iostream istream
    iterator latch limits list locale map memory memory_resource mutex new numbers numeric optional
    ostream queue random ranges ratio regex scoped_allocator semaphore set shared_mutex source_location
    span sstream stack stdexcept stop_token streambuf string string_view syncstream system_error
    thread tuple type_traits typeindex typeinfo unordered_map unordered_set utility valarray variant
    vector version)
set(std_c assert.h errno.h limits.h stdarg.h stdbool.h stddef.h stdint.h stdio.h stdlib.h string.h)

file(GLOB headers RELATIVE ${INCLUDE_DIR} ${INCLUDE_DIR}/kvtier/*.h)
list(LENGTH headers count)
if(count LESS 10)
  message(FATAL_ERROR "public_headers: found only ${count} headers under ${INCLUDE_DIR}/kvtier")
endif()
set(errors "")
foreach(h ${headers})
  file(STRINGS ${INCLUDE_DIR}/${h} lines REGEX "^[ \t]*#[ \t]*include")
  foreach(line ${lines})
    if(line MATCHES "#[ \t]*include[ \t]*\"([^\"]+)\"")
      set(inc ${CMAKE_MATCH_1})
      if(NOT inc MATCHES "^kvtier/" OR NOT EXISTS ${INCLUDE_DIR}/${inc})
        string(APPEND errors "  ${h}: #include \"${inc}\" is not a public header\n")
      endif()
    elseif(line MATCHES "#[ \t]*include[ \t]*<([^>]+)>")
      set(inc ${CMAKE_MATCH_1})
      if(h STREQUAL "kvtier/kvtier.h")
        list(FIND std_c ${inc} found)
      else()
        list(FIND std_cxx ${inc} found)
      endif()
      if(found EQUAL -1)
        string(APPEND errors "  ${h}: #include <${inc}> is not a standard library header\n")
      endif()
    else()
      string(APPEND errors "  ${h}: cannot read include line '${line}'\n")
    endif()
  endforeach()
endforeach()
if(errors)
  message(FATAL_ERROR "public_headers: public headers include more than themselves and the standard library:\n${errors}")
endif()

file(MAKE_DIRECTORY ${WORK_DIR})
function(compile what compiler)
  execute_process(COMMAND ${compiler} ${ARGN} -fsyntax-only -Wall -Wextra -Werror -I${INCLUDE_DIR}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "public_headers: ${what} does not compile with only -I${INCLUDE_DIR}:\n${out}")
  endif()
endfunction()
set(all "")
foreach(h ${headers})
  string(MAKE_C_IDENTIFIER ${h} id)
  file(WRITE ${WORK_DIR}/${id}.cpp "#include \"${h}\"\n#include \"${h}\"\n")
  compile("${h} alone (C++20)" ${CXX} -std=c++20 -x c++ ${WORK_DIR}/${id}.cpp)
  string(APPEND all "#include \"${h}\"\n")
endforeach()
file(WRITE ${WORK_DIR}/all_headers.cpp "${all}int main() { return 0; }\n")
compile("every public header together (C++20)" ${CXX} -std=c++20 -x c++ ${WORK_DIR}/all_headers.cpp)
file(WRITE ${WORK_DIR}/kvtier_c.c "#include \"kvtier/kvtier.h\"\nint main(void) { return kvtier_status_name(KVTIER_OK) ? 0 : 1; }\n")
compile("kvtier/kvtier.h (C11)" ${CC} -std=c11 -pedantic -x c ${WORK_DIR}/kvtier_c.c)
message(STATUS "public_headers: ${count} headers stand alone (C++20), kvtier.h as C11")
