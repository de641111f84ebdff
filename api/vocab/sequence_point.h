// Named sequence points: places in kvtier's code where a test can hold the thread that gets there
// until the test has done something of its own, so a race ("evict while a restore reads") runs in
// the one order the test names, every time, instead of by luck or a sleep.
//
//   KVTIER_SEQUENCE_POINT("tier_manager.load.nvme_read");   // in the code, where the race is
//
//   sequence::Hold hold("tier_manager.load.nvme_read");     // in a test, before the thread starts
//   std::thread t([&] { ... load ... });
//   hold.wait_reached();                                     // t is now held at the point
//   ... evict ...                                            // runs while t is there
//   hold.release();
//
// Built in only with KVTIER_SEQUENCE_POINTS (on with the test suite, KVTIER_TESTS); a release build
// (the wheel, a build without tests) compiles every point to nothing. Built in, a point costs one
// relaxed atomic load while no Hold exists. Internal to kvtier: not a public header.
#pragma once

#include <string>
#include <string_view>

namespace kvtier::sequence {

/// What KVTIER_SEQUENCE_POINT calls: holds the calling thread while a Hold on `name` waits for it.
void reached(std::string_view name);

/// Arms the point `name` while it lives: the first thread to reach it is held there until
/// release() (or the Hold's end, which also waits for that thread to leave the point). Later
/// threads pass. At most one Hold per name at a time.
class Hold {
 public:
  explicit Hold(std::string name);
  ~Hold();
  Hold(const Hold&) = delete;
  Hold& operator=(const Hold&) = delete;

  /// Blocks until a thread is held at the point.
  void wait_reached();
  /// Lets the held thread (and every later one) go on.
  void release();

 private:
  std::string name_;
};

}  // namespace kvtier::sequence

#if KVTIER_SEQUENCE_POINTS
#define KVTIER_SEQUENCE_POINT(name) ::kvtier::sequence::reached(name)
#else
#define KVTIER_SEQUENCE_POINT(name) static_cast<void>(0)
#endif
