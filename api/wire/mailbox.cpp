#include "api/wire/mailbox.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace kvtier::proto {

void build_frame(uint16_t op, uint32_t request_id, std::span<const std::byte> payload, std::vector<std::byte>& out) {
  out.resize(kHeaderBytes);
  encode_header({.op = op, .request_id = request_id, .payload_bytes = static_cast<uint32_t>(payload.size())},
                out.data());
  out.insert(out.end(), payload.begin(), payload.end());
}

Status split_frame(std::span<const std::byte> frame, FrameHeader& header, std::span<const std::byte>& payload) {
  if (frame.size() < kHeaderBytes) {
    return Status(StatusCode::kProtocolError, "a mailbox frame of " + std::to_string(frame.size()) + " bytes has no header");
  }
  auto h = decode_header(frame.first(kHeaderBytes));
  if (!h) return h.status();
  header = *h;  // also on the error below: the error reply answers this request's id
  if (h->payload_bytes != frame.size() - kHeaderBytes) {
    return Status(StatusCode::kProtocolError, "the mailbox frame's length differs from its header's");
  }
  payload = frame.subspan(kHeaderBytes);
  return Status::ok();
}

bool Mailbox::publish(Slot slot, std::span<const std::byte> frame, uint32_t seq) noexcept {
  if (!frame.empty()) std::memcpy(base_ + frame_at(slot), frame.data(), frame.size());
  word(len_at(slot)).store(static_cast<uint32_t>(frame.size()), std::memory_order_relaxed);
  stamp(slot).store(static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()),
                    std::memory_order_relaxed);
  word(seq_at(slot)).store(seq, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with the fence in park()
  return word(parked_at(slot)).load(std::memory_order_relaxed) != 0;
}

void Mailbox::read(Slot slot, std::vector<std::byte>& out) const {
  const uint32_t len = std::min(word(len_at(slot)).load(std::memory_order_relaxed), slot_bytes_);
  out.resize(len);
  if (len > 0) std::memcpy(out.data(), base_ + frame_at(slot), len);
}

uint32_t Mailbox::park(Slot slot) noexcept {
  word(parked_at(slot)).store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with the fence in publish()
  return seq(slot);
}

}  // namespace kvtier::proto
