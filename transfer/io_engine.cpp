#include "transfer/io_engine.h"

#include <spdlog/spdlog.h>

#include "transfer/thread_pool_io_engine.h"
#include "transfer/uring_io_engine.h"

namespace kvtier {

std::string_view io_engine_kind_name(IoEngineKind kind) noexcept {
  switch (kind) {
    case IoEngineKind::kAuto: return "auto";
    case IoEngineKind::kUring: return "io_uring";
    case IoEngineKind::kThreadPool: return "thread_pool";
  }
  return "unknown";
}

Result<std::unique_ptr<IoEngine>> create_io_engine(const IoEngineOptions& options) {
  if (options.queue_depth == 0) return invalid_argument("io engine queue_depth must be > 0");
  switch (options.kind) {
    case IoEngineKind::kThreadPool:
      return std::unique_ptr<IoEngine>(
          std::make_unique<ThreadPoolIoEngine>(options.threads, options.queue_depth));
    case IoEngineKind::kUring: {
      auto uring = UringIoEngine::create(options);
      if (!uring) return uring.status();
      return std::unique_ptr<IoEngine>(std::move(*uring));
    }
    case IoEngineKind::kAuto: {
      auto uring = UringIoEngine::create(options);
      if (uring) {
        spdlog::info("kvtier transfer: io engine {}", (*uring)->describe());
        return std::unique_ptr<IoEngine>(std::move(*uring));
      }
      auto pool = std::make_unique<ThreadPoolIoEngine>(options.threads, options.queue_depth);
      spdlog::info("kvtier transfer: io engine {} ({})", pool->describe(), uring.status().message());
      return std::unique_ptr<IoEngine>(std::move(pool));
    }
  }
  return invalid_argument("unknown io engine kind");
}

}  // namespace kvtier
