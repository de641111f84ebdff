#include "api/store/reclaimer.h"

#include <utility>

namespace kvtier {

Reclaimer::Reclaimer(Mode mode, Pass pass) : mode_(mode), pass_(std::move(pass)) {
  if (mode_ == Mode::kThread) thread_ = std::thread([this] { loop(); });
}

Reclaimer::~Reclaimer() { stop(); }

void Reclaimer::kick() {
  {
    std::lock_guard lock(mu_);
    if (stop_.load(std::memory_order_relaxed)) return;
    kicked_ = true;
  }
  cv_.notify_all();
}

bool Reclaimer::pending() const {
  std::lock_guard lock(mu_);
  return kicked_;
}

// Called with `lock` held and kicked_ set; returns with it held.
void Reclaimer::run_pass(std::unique_lock<std::mutex>& lock) {
  kicked_ = false;
  busy_ = true;
  lock.unlock();
  pass_(stop_);
  passes_.fetch_add(1, std::memory_order_relaxed);
  lock.lock();
  busy_ = false;
  cv_.notify_all();
}

bool Reclaimer::step() {
  if (mode_ != Mode::kStepped) return false;
  std::unique_lock lock(mu_);
  if (!kicked_ || busy_ || stop_.load(std::memory_order_relaxed)) return false;
  run_pass(lock);
  return true;
}

void Reclaimer::wait_idle() {
  if (mode_ != Mode::kThread) return;
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return stop_.load(std::memory_order_relaxed) || (!kicked_ && !busy_); });
}

void Reclaimer::stop() {
  {
    std::lock_guard lock(mu_);
    stop_.store(true, std::memory_order_relaxed);  // a running pass ends after its current round
    kicked_ = false;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Reclaimer::loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return kicked_ || stop_.load(std::memory_order_relaxed); });
    if (stop_.load(std::memory_order_relaxed)) break;
    run_pass(lock);
  }
}

}  // namespace kvtier
