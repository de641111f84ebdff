// Reclaimer: the tier manager's background reclaimer as a class of its own. A save that takes a
// tier past its high watermark kick()s it; a pass (given at construction) brings every tier above
// its high watermark down to its low one while saves go on. Kicks that arrive during a pass ask
// for one more pass, never for one each.
//
// It runs in one of two ways, as CacheLib Navy's job scheduler does:
//   kThread   its own thread runs a pass after each kick (the service's mode);
//   kStepped  no thread: a kick only marks a pass pending, and whoever owns the reclaimer runs it
//             with step(). A test decides when a pass runs, so what it moves happens at a point
//             the test chose, not between two of the test's reads.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace kvtier {

class Reclaimer {
 public:
  enum class Mode : uint8_t { kThread, kStepped };
  /// One pass; it returns early once `stop` is set.
  using Pass = std::function<void(const std::atomic<bool>& stop)>;

  Reclaimer(Mode mode, Pass pass);
  ~Reclaimer();  // stop()
  Reclaimer(const Reclaimer&) = delete;
  Reclaimer& operator=(const Reclaimer&) = delete;

  /// Asks for a pass. Cheap: a save calls it while it goes on.
  void kick();
  /// kStepped: runs one pass, on this thread, when one is pending, and says whether it did.
  /// kThread: false, runs nothing (the thread does).
  bool step();
  /// Whether a pass was asked for and has not started.
  bool pending() const;
  /// kThread: blocks until no pass is pending or running. kStepped: returns at once (a pending
  /// pass waits for step()).
  void wait_idle();
  /// Ends a running pass after its current round and the thread; later kicks do nothing.
  /// Idempotent.
  void stop();

  /// Passes run so far.
  uint64_t passes() const noexcept { return passes_.load(std::memory_order_relaxed); }
  Mode mode() const noexcept { return mode_; }

 private:
  void loop();
  void run_pass(std::unique_lock<std::mutex>& lock);

  const Mode mode_;
  const Pass pass_;
  mutable std::mutex mu_;
  std::condition_variable cv_;  // kicks, stop, and the end of a pass (wait_idle)
  bool kicked_ = false, busy_ = false;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> passes_{0};
  std::thread thread_;
};

}  // namespace kvtier
