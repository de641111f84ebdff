#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

// The TSan suppressions for the uninstrumented RocksDB, in every test binary.
#include "tiers/tsan_suppressions.h"
