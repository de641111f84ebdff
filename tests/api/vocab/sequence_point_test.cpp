// Named sequence points (api/vocab/sequence_point.h): a Hold stops the first thread at its point
// until released, lets later threads and other points pass, and waits for the held thread to
// leave before it ends.
#include "api/vocab/sequence_point.h"

#include <catch2/catch.hpp>

#include <atomic>
#include <stdexcept>
#include <thread>

namespace kvtier {

TEST_CASE("A sequence point holds the first thread to reach it until released", "[vocab][sequence]") {
  std::atomic<int> stage{0};
  sequence::Hold hold("test.point");
  std::thread t([&] {
    stage = 1;
    KVTIER_SEQUENCE_POINT("test.other");  // not armed: passes
    KVTIER_SEQUENCE_POINT("test.point");  // held here
    stage = 2;
    KVTIER_SEQUENCE_POINT("test.point");  // taken once: passes
    stage = 3;
  });
  hold.wait_reached();
  CHECK(stage == 1);  // held: it cannot have gone past the point
  KVTIER_SEQUENCE_POINT("test.point");  // another thread passes while the first is held
  hold.release();
  t.join();
  CHECK(stage == 3);
  CHECK_THROWS_AS(sequence::Hold("test.point"), std::logic_error);  // one Hold per name
}

TEST_CASE("An unarmed sequence point lets every thread pass", "[vocab][sequence]") {
  int passed = 0;
  for (int i = 0; i < 3; ++i) {
    KVTIER_SEQUENCE_POINT("test.point");
    ++passed;
  }
  CHECK(passed == 3);
  { sequence::Hold h("test.point"); }  // armed and ended with no thread: nothing waits
  KVTIER_SEQUENCE_POINT("test.point");
}

}  // namespace kvtier
