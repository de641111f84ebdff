// Status and Result carry codes and messages; an ok Status cannot masquerade as an error Result.
#include <catch2/catch.hpp>

#include "kvtier/status.h"

using namespace kvtier;

TEST_CASE("Status carries a code and a readable message") {
  Status ok;
  CHECK(ok.is_ok());
  CHECK(ok.to_string() == "ok");
  Status bad = invalid_argument("block_tokens must be positive");
  CHECK_FALSE(bad.is_ok());
  CHECK(bad.code() == StatusCode::kInvalidArgument);
  CHECK(bad.to_string() == "invalid_argument: block_tokens must be positive");
  Status copy = bad;  // copies share the message: the same bytes, not a copy of them
  CHECK(copy.message() == bad.message());
  CHECK(copy.message().data() == bad.message().data());
}

TEST_CASE("Result holds a value or an error, never an ok error") {
  Result<int> v = 7;
  REQUIRE(v.is_ok());
  CHECK(*v == 7);
  CHECK(v.status().is_ok());
  Result<int> e = not_found("no such block");
  REQUIRE_FALSE(e.is_ok());
  CHECK(e.status().code() == StatusCode::kNotFound);
  Result<int> wrong = Status::ok();
  REQUIRE_FALSE(wrong.is_ok());
  CHECK(wrong.status().code() == StatusCode::kInternal);
}

namespace {
Status fails_second(int i) { return i == 2 ? busy("pinned") : Status::ok(); }
Status run_all() {
  for (int i = 0; i < 4; ++i) KVTIER_RETURN_IF_ERROR(fails_second(i));
  return Status::ok();
}
}  // namespace

TEST_CASE("KVTIER_RETURN_IF_ERROR stops at the first error") {
  CHECK(run_all().code() == StatusCode::kBusy);
}
