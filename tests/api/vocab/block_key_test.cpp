// BlockKey: hex round trip, bad hex rejected, usable as an ordered and hashed map key.
#include <catch2/catch.hpp>

#include <set>
#include <unordered_set>

#include "kvtier/block_key.h"

using namespace kvtier;

TEST_CASE("BlockKey round-trips through hex") {
  BlockKey k{0x0123456789abcdefull, 0xfedcba9876543210ull};
  CHECK(k.to_hex() == "fedcba98765432100123456789abcdef");
  auto back = BlockKey::from_hex(k.to_hex());
  REQUIRE(back.is_ok());
  CHECK(*back == k);
  auto upper = BlockKey::from_hex("FEDCBA98765432100123456789ABCDEF");
  REQUIRE(upper.is_ok());
  CHECK(*upper == k);
}

TEST_CASE("BlockKey rejects malformed hex") {
  CHECK(BlockKey::from_hex("").status().code() == StatusCode::kInvalidArgument);
  CHECK(BlockKey::from_hex("abc").status().code() == StatusCode::kInvalidArgument);
  CHECK(BlockKey::from_hex("fedcba98765432100123456789abcdeg").status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(BlockKey::from_hex(std::string(33, 'a')).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("BlockKey works as a hash and ordered key") {
  std::unordered_set<BlockKey> hashed;
  std::set<BlockKey> ordered;
  for (uint64_t i = 0; i < 1000; ++i) {
    BlockKey k{i * 7919, i % 3};
    hashed.insert(k);
    ordered.insert(k);
  }
  CHECK(hashed.size() == 1000);
  CHECK(ordered.size() == 1000);
  CHECK(hashed.count(BlockKey{7919, 1}) == 1);
  CHECK((BlockKey{1, 0} < BlockKey{0, 1}));
}
