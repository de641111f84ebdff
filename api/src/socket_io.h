// Frames over a Unix stream socket, for the daemon and its client: whole-buffer reads and writes
// that survive EINTR and short transfers, and one file descriptor passed with SCM_RIGHTS.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "api/src/protocol.h"
#include "kvtier/status.h"

namespace kvtier::proto {

/// Writes a frame (header + payload). `pass_fd` >= 0 rides along with the header (SCM_RIGHTS).
/// kUnavailable when the peer is gone. Never raises SIGPIPE.
Status send_frame(int sock, uint16_t op, uint32_t request_id, std::span<const std::byte> payload,
                  int pass_fd = -1);

/// Reads one frame. kUnavailable at a clean end of stream (the peer closed between frames),
/// kProtocolError for a bad header or a stream cut inside a frame. A descriptor passed with the
/// frame is returned in `received_fd` (else -1); the caller owns it. The header is returned even
/// when its version is not ours, so the caller can answer before closing.
Status recv_frame(int sock, FrameHeader& header, std::vector<std::byte>& payload, int& received_fd);

/// Connects to a Unix socket path. kUnavailable when nothing listens there.
Result<int> connect_unix(const std::string& path);

}  // namespace kvtier::proto
