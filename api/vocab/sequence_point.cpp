// Named sequence points (sequence_point.h).
#include "api/vocab/sequence_point.h"

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <stdexcept>

namespace kvtier::sequence {
namespace {

struct Point {
  bool taken = false;     // a thread has reached it (only the first is held)
  bool held = false;      // that thread is at the point now
  bool released = false;
};

struct Points {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, Point, std::less<>> armed;
};

Points& points() {
  static Points p;
  return p;
}

std::atomic<int> armed_count{0};

}  // namespace

void reached(std::string_view name) {
  if (armed_count.load(std::memory_order_acquire) == 0) return;
  Points& ps = points();
  std::unique_lock lock(ps.mu);
  auto it = ps.armed.find(name);
  if (it == ps.armed.end() || it->second.taken) return;
  Point& p = it->second;
  p.taken = p.held = true;
  ps.cv.notify_all();
  ps.cv.wait(lock, [&] { return p.released; });
  p.held = false;
  ps.cv.notify_all();
}

Hold::Hold(std::string name) : name_(std::move(name)) {
  Points& ps = points();
  std::lock_guard lock(ps.mu);
  if (!ps.armed.try_emplace(name_).second) throw std::logic_error("sequence point '" + name_ + "' is armed twice");
  armed_count.fetch_add(1, std::memory_order_release);
}

Hold::~Hold() {
  release();
  Points& ps = points();
  std::unique_lock lock(ps.mu);
  auto it = ps.armed.find(name_);
  ps.cv.wait(lock, [&] { return !it->second.held; });
  ps.armed.erase(it);
  armed_count.fetch_sub(1, std::memory_order_release);
}

void Hold::wait_reached() {
  Points& ps = points();
  std::unique_lock lock(ps.mu);
  Point& p = ps.armed.find(name_)->second;
  ps.cv.wait(lock, [&] { return p.held; });
}

void Hold::release() {
  Points& ps = points();
  std::lock_guard lock(ps.mu);
  ps.armed.find(name_)->second.released = true;
  ps.cv.notify_all();
}

}  // namespace kvtier::sequence
