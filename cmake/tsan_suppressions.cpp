// ThreadSanitizer suppressions, compiled into every program of the tsan build and no other
// (cmake/kvtier_tsan.cmake adds this file to each executable), so a TSan build runs clean without a
// suppressions file. Debian's librocksdb is not instrumented: TSan sees its memcpy, write and
// mutex interceptors but not the atomics and futexes that order them, and reports races inside
// RocksDB (group commit, cache-role registry) that are not there. Races in kvtier's own code are
// still reported unless a RocksDB frame is on the stack. (Catalog also serializes its RocksDB
// calls in TSan builds, for the reports whose stacks hold no RocksDB frame.)
extern "C" __attribute__((visibility("default"), used)) const char* __tsan_default_suppressions() {
  return "called_from_lib:librocksdb.so\n"
         "race:librocksdb.so\n"
         // RocksDB's block decompression: snappy, called from librocksdb only, writes blocks that
         // RocksDB's own threads then read under its uninstrumented synchronization (their stacks
         // lose the librocksdb frames, so the two rules above miss them).
         "called_from_lib:libsnappy.so.1\n"
         "race:libsnappy.so.1\n";
}
