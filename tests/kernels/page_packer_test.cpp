// DevicePagePacker over host lanes (device memory emulated in host memory): unpack and pack
// through staging in pieces give exactly what the CPU reference gives in one call, for every
// engine layout, layer ranges, shuffled and back-to-back slots, staging of one block to all; a
// small device table splits launches; bad input fails before any launch; a failing lane is
// dropped and replaced; lanes are bounded and reused.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <thread>

#include "kernel_test_support.h"
#include "kernels/page_packer.h"

using namespace kvtier;
using namespace kvtier::kernels;
using namespace kvtier::kernels::testing;

namespace {

// A host lane that counts its steps and fails the Nth launch or data copy when told to.
struct LaneLog {
  int launches = 0;
  int data_copies = 0;  // copies other than the device table's
  int fail_launch_at = -1;
  int fail_copy_at = -1;
  int made = 0;
  const void* unreachable = nullptr;  // check_reachable refuses it, as the CUDA lane refuses host memory
};

class CountingLane final : public PackLaneBackend {
 public:
  CountingLane(LaneLog& log, uint64_t staging, uint64_t table) : log_(log), lane_(make_host_pack_lane(staging, table)) {}
  std::byte* staging() noexcept override { return lane_->staging(); }
  uint64_t staging_bytes() const noexcept override { return lane_->staging_bytes(); }
  std::byte* table() noexcept override { return lane_->table(); }
  uint64_t table_bytes() const noexcept override { return lane_->table_bytes(); }
  Status check_reachable(const void* p, const char* what) override {
    if (p == log_.unreachable) return invalid_argument(std::string(what) + " is not GPU memory");
    return Status::ok();
  }
  Status copy_to_device(void* dst, const void* src, uint64_t bytes) override {
    KVTIER_RETURN_IF_ERROR(count_copy(dst));
    return lane_->copy_to_device(dst, src, bytes);
  }
  Status copy_to_host(void* dst, const void* src, uint64_t bytes) override {
    KVTIER_RETURN_IF_ERROR(count_copy(dst));
    return lane_->copy_to_host(dst, src, bytes);
  }
  Status launch(const PagePackArgs& args, bool pack) override {
    if (log_.launches++ == log_.fail_launch_at) return Status(StatusCode::kInternal, "injected launch failure");
    return lane_->launch(args, pack);
  }
  Status sync() override { return lane_->sync(); }

 private:
  Status count_copy(void* dst) {
    if (dst == lane_->table()) return Status::ok();
    if (log_.data_copies++ == log_.fail_copy_at) return Status(StatusCode::kInternal, "injected copy failure");
    return Status::ok();
  }
  LaneLog& log_;
  std::unique_ptr<PackLaneBackend> lane_;
};

DevicePagePacker counting_packer(LaneLog& log, PagePackerOptions o) {
  return DevicePagePacker(
      [&log](uint64_t staging, uint64_t table) -> Result<std::unique_ptr<PackLaneBackend>> {
        ++log.made;
        return std::unique_ptr<PackLaneBackend>(std::make_unique<CountingLane>(log, staging, table));
      },
      o);
}

// Engine tensors and an arena of random bytes, with a batch of blocks.
struct PagedCase {
  KvLayout layout;
  uint32_t pages = 10, slots = 12;
  std::vector<std::vector<uint8_t>> engine;
  std::vector<uint8_t> arena;
  std::vector<int32_t> slot_ids, page_ids;
  std::vector<void*> bases;

  PagedCase(Rng& rng, bool back_to_back, uint32_t blocks = 7) {
    layout = *KvLayout::standard(4, 2, 32, Dtype::kBf16, 16);
    const uint64_t layer_bytes = uint64_t(pages) * layout.bytes_per_block_layer();
    engine.assign(layout.num_layers, std::vector<uint8_t>(layer_bytes));
    for (auto& t : engine) rng.fill_bytes(t);
    arena.resize(slots * layout.bytes_per_block());
    rng.fill_bytes(arena);
    slot_ids.resize(slots);
    page_ids.resize(pages);
    std::iota(slot_ids.begin(), slot_ids.end(), 0);
    std::iota(page_ids.begin(), page_ids.end(), 0);
    if (!back_to_back) std::shuffle(slot_ids.begin(), slot_ids.end(), rng.gen);
    std::shuffle(page_ids.begin(), page_ids.end(), rng.gen);
    slot_ids.resize(blocks);
    page_ids.resize(blocks);
  }
  PagePackArgs args(EngineLayout e, uint32_t layer_begin, uint32_t layer_count) {
    bases.clear();
    for (auto& t : engine) bases.push_back(t.data());
    PagePackArgs a;
    a.layout = layout;
    a.arena = arena.data();
    a.num_slots = slots;
    a.engine = e;
    a.layer_base = bases.data();
    a.engine_num_pages = pages;
    a.arena_slots = slot_ids.data();
    a.engine_pages = page_ids.data();
    a.num_blocks = uint32_t(slot_ids.size());
    a.layer_begin = layer_begin;
    a.layer_count = layer_count;
    return a;
  }
};

}  // namespace

TEST_CASE("Page packer: unpack and pack through staging match the CPU reference", "[packer]") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const auto engine = GENERATE(EngineLayout::kVllm, EngineLayout::kFlashInferNhd, EngineLayout::kFlashInferHnd);
  const uint32_t staging_blocks = GENERATE(1u, 3u, 100u);
  const bool back_to_back = GENERATE(true, false);
  const auto [layer_begin, layer_count] = GENERATE(std::pair<uint32_t, uint32_t>{0, 4}, std::pair<uint32_t, uint32_t>{1, 2});
  CAPTURE(int(engine), staging_blocks, back_to_back, layer_begin, layer_count);

  PagedCase want(rng, back_to_back);
  PagedCase got = want;
  const uint64_t staged_block = uint64_t(layer_count) * want.layout.bytes_per_block_layer();
  LaneLog log;
  auto packer = counting_packer(log, {.staging_bytes = staging_blocks * staged_block});
  auto lane = packer.acquire();
  REQUIRE(lane.is_ok());
  const int launches = int((7 + std::min(staging_blocks, 7u) - 1) / std::min(staging_blocks, 7u));

  SECTION("unpack: engine pages from canonical blocks in host memory") {
    REQUIRE(unpack_pages_cpu(want.args(engine, layer_begin, layer_count)).is_ok());
    REQUIRE(lane->unpack_from_host(got.args(engine, layer_begin, layer_count)).is_ok());
    CHECK(got.engine == want.engine);  // every byte: the pages written, and the rest untouched
    CHECK(got.arena == want.arena);
    CHECK(log.launches == launches);
    // One copy per run of blocks back to back in host memory within a piece: whole blocks only
    // (a layer range leaves gaps between blocks).
    const uint32_t per_piece = std::min(staging_blocks, 7u);
    int runs = 0;
    for (uint32_t i = 0; i < 7; ++i) {
      const bool joins = i % per_piece != 0 && layer_count == 4 && got.slot_ids[i] == got.slot_ids[i - 1] + 1;
      if (!joins) ++runs;
    }
    if (back_to_back && layer_count == 4) CHECK(runs == launches);
    if (layer_count != 4) CHECK(runs == 7);
    CHECK(log.data_copies == runs);
  }
  SECTION("pack: canonical blocks in host memory from engine pages") {
    REQUIRE(pack_pages_cpu(want.args(engine, layer_begin, layer_count)).is_ok());
    REQUIRE(lane->pack_to_host(got.args(engine, layer_begin, layer_count)).is_ok());
    CHECK(got.arena == want.arena);  // the other layers and slots keep their bytes
    CHECK(got.engine == want.engine);
    CHECK(log.launches == launches);
  }
}

TEST_CASE("Page packer: canonical blocks already in device memory, a table too small for one launch", "[packer]") {
  Rng rng(test_seed());
  PagedCase want(rng, false);
  PagedCase got = want;
  LaneLog log;
  // Room for the 4 layer tensors and 2 blocks: 7 blocks take 4 launches.
  auto packer = counting_packer(log, {.table_bytes = 4 * sizeof(void*) + 2 * 2 * sizeof(int32_t)});
  auto lane = packer.acquire();
  REQUIRE(lane.is_ok());
  const bool pack = GENERATE(false, true);
  CAPTURE(pack);
  if (pack) {  // the arena is written where it is
    REQUIRE(pack_pages_cpu(want.args(EngineLayout::kFlashInferHnd, 1, 3)).is_ok());
    REQUIRE(lane->pack_device(got.args(EngineLayout::kFlashInferHnd, 1, 3)).is_ok());
  } else {  // the arena is read where it is
    REQUIRE(unpack_pages_cpu(want.args(EngineLayout::kFlashInferHnd, 1, 3)).is_ok());
    REQUIRE(lane->unpack_device(got.args(EngineLayout::kFlashInferHnd, 1, 3)).is_ok());
  }
  CHECK(got.engine == want.engine);
  CHECK(got.arena == want.arena);
  CHECK(log.launches == 4);
  CHECK(log.data_copies == 0);
}

TEST_CASE("Page packer: bad input fails before any launch, and the lane stays usable", "[packer]") {
  Rng rng(test_seed());
  PagedCase c(rng, true);
  LaneLog log;
  auto packer = counting_packer(log, {.staging_bytes = 1000});  // less than one block
  {
    auto lane = packer.acquire();
    REQUIRE(lane.is_ok());
    Status s = lane->unpack_from_host(c.args(EngineLayout::kVllm, 0, 0));
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK(s.message().find("cannot hold one block") != std::string_view::npos);
    c.slot_ids[3] = int32_t(c.slots);  // past the arena
    CHECK(lane->unpack_device(c.args(EngineLayout::kVllm, 0, 0)).code() == StatusCode::kInvalidArgument);
    c.slot_ids[3] = 0;
    c.page_ids[2] = -1;
    CHECK(lane->pack_to_host(c.args(EngineLayout::kVllm, 0, 0)).code() == StatusCode::kInvalidArgument);
    c.page_ids[2] = 1;
    CHECK(lane->unpack_device(c.args(EngineLayout::kVllm, 3, 2)).code() == StatusCode::kInvalidArgument);
    // A layer tensor the lane cannot reach (host memory given as GPU memory, another GPU's).
    log.unreachable = c.engine[2].data();
    Status far = lane->unpack_device(c.args(EngineLayout::kVllm, 0, 0));
    CHECK(far.code() == StatusCode::kInvalidArgument);
    CHECK(far.message().find("not GPU memory") != std::string_view::npos);
    CHECK(lane->pack_to_host(c.args(EngineLayout::kVllm, 1, 2)).code() == StatusCode::kInvalidArgument);
    CHECK(lane->unpack_from_host(c.args(EngineLayout::kVllm, 2, 1)).message().find("not GPU memory") !=
          std::string_view::npos);
    CHECK(log.launches == 0);
    CHECK(log.data_copies == 0);
  }
  CHECK(packer.lanes() == 1);  // given back, not dropped
  auto again = packer.acquire();
  REQUIRE(again.is_ok());
  CHECK(log.made == 1);
}

TEST_CASE("Page packer: a failing lane reports the error and is replaced", "[packer]") {
  Rng rng(test_seed());
  PagedCase want(rng, true);
  PagedCase got = want;
  LaneLog log;
  auto packer = counting_packer(log, {.staging_bytes = 2 * want.layout.bytes_per_block()});
  const bool launch_fails = GENERATE(true, false);  // else a copy fails
  CAPTURE(launch_fails);
  if (launch_fails) {
    log.fail_launch_at = 1;
  } else {
    log.fail_copy_at = 2;
  }
  {
    auto lane = packer.acquire();
    REQUIRE(lane.is_ok());
    Status s = lane->unpack_from_host(got.args(EngineLayout::kVllm, 0, 0));
    CHECK(s.code() == StatusCode::kInternal);
    CHECK(s.message().find("injected") != std::string_view::npos);
  }
  CHECK(packer.lanes() == 0);  // dropped: a CUDA stream may be unusable after an error
  log.fail_launch_at = log.fail_copy_at = -1;
  auto lane = packer.acquire();
  REQUIRE(lane.is_ok());
  CHECK(log.made == 2);
  REQUIRE(unpack_pages_cpu(want.args(EngineLayout::kVllm, 0, 0)).is_ok());
  REQUIRE(lane->unpack_from_host(got.args(EngineLayout::kVllm, 0, 0)).is_ok());
  CHECK(got.engine == want.engine);
}

TEST_CASE("Page packer: lanes are bounded and reused, and a lane that cannot be made is an error", "[packer]") {
  LaneLog log;
  SECTION("one lane: a second taker gets it once the first gives it back") {
    auto packer = counting_packer(log, {.max_lanes = 1});
    auto first = packer.acquire();
    REQUIRE(first.is_ok());
    std::optional<Result<DevicePagePacker::Lane>> second;
    std::atomic<bool> returned{false};
    std::thread taker([&] {
      second.emplace(packer.acquire());
      returned = true;
    });
    // Until the taker waits in acquire(), or (the bound broken) returns at once.
    while (packer.waiters() == 0 && !returned.load()) std::this_thread::yield();
    CHECK_FALSE(returned.load());
    CHECK(packer.lanes() == 1);
    { auto done = std::move(*first); }  // gives the lane back: the taker wakes with it
    taker.join();
    REQUIRE(second.has_value());
    CHECK(second->is_ok());
    CHECK(log.made == 1);
    CHECK(packer.lanes() == 1);
  }
  SECTION("no device memory: acquire says so, and a later acquire tries again") {
    bool fail = true;
    DevicePagePacker packer(
        [&](uint64_t staging, uint64_t table) -> Result<std::unique_ptr<PackLaneBackend>> {
          if (fail) return Status(StatusCode::kResourceExhausted, "cudaMalloc (staging): out of memory");
          return make_host_pack_lane(staging, table);
        },
        {.max_lanes = 1});
    auto lane = packer.acquire();
    REQUIRE_FALSE(lane.is_ok());
    CHECK(lane.status().code() == StatusCode::kResourceExhausted);
    CHECK(packer.lanes() == 0);
    fail = false;
    CHECK(packer.acquire().is_ok());
  }
}
