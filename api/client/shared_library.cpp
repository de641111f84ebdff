// libkvtier_client.so is made of the thin client's static libraries, linked whole
// (api/client/CMakeLists.txt); a shared library needs at least one source of its own.
#include "kvtier/kvtier.h"
