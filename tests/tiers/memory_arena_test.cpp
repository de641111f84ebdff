// The host and HBM arenas and the slot allocator: shapes, alignment, bad input, sharing by memfd,
// and that every byte of arena memory is returned at destruction.
#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <cstring>
#include <set>
#include <thread>

#include "tiers/memory_arena.h"
#include "tiers/slot_allocator.h"
#include "tiers/storage_device.h"

using namespace kvtier;

TEST_CASE("Slot allocator hands out each slot once and refuses double frees") {
  SlotAllocator alloc(4);
  std::set<SlotId> got;
  for (int i = 0; i < 4; ++i) {
    auto s = alloc.allocate();
    REQUIRE(s.is_ok());
    got.insert(*s);
  }
  CHECK(got == std::set<SlotId>{0, 1, 2, 3});
  CHECK(alloc.allocate().status().code() == StatusCode::kResourceExhausted);
  CHECK(alloc.free(2).is_ok());
  CHECK(alloc.free(2).code() == StatusCode::kInvalidArgument);
  CHECK(alloc.free(9).code() == StatusCode::kInvalidArgument);
  CHECK(alloc.used() == 3);
  CHECK(*alloc.allocate() == 2);
}

TEST_CASE("Slot allocator claim rebuilds used slots and allocate skips them") {
  SlotAllocator alloc(3);
  REQUIRE(alloc.claim(0).is_ok());
  REQUIRE(alloc.claim(2).is_ok());
  CHECK(alloc.claim(2).code() == StatusCode::kAlreadyExists);
  CHECK(*alloc.allocate() == 1);
  CHECK(alloc.allocate().status().code() == StatusCode::kResourceExhausted);
  REQUIRE(alloc.free(0).is_ok());
  REQUIRE(alloc.free(2).is_ok());
  std::set<SlotId> again{*alloc.allocate(), *alloc.allocate()};
  CHECK(again == std::set<SlotId>{0, 2});
  CHECK(alloc.free_count() == 0);
}

TEST_CASE("Slot allocator under concurrent allocate and free never double-books") {
  SlotAllocator alloc(64);
  std::vector<std::atomic<int>> owners(64);
  std::atomic<int> conflicts{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5000; ++i) {
        auto s = alloc.allocate();
        if (!s) continue;
        if (owners[*s].fetch_add(1) != 0) conflicts++;
        owners[*s].fetch_sub(1);
        if (!alloc.free(*s).is_ok()) conflicts++;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(conflicts == 0);
  CHECK(alloc.used() == 0);
}

TEST_CASE("Host arena slots are aligned, writable and the memory is returned") {
  const uint64_t before = arena_bytes_outstanding();
  {
    auto arena = create_host_arena({.slot_bytes = 10000, .slots = 8});
    REQUIRE(arena.is_ok());
    auto& a = **arena;
    CHECK(a.slot_bytes() == 12288);  // rounded up to 4 KiB
    CHECK((a.kind() == ArenaKind::kHostPinned || a.kind() == ArenaKind::kHostPageable));
    CHECK_FALSE(a.is_device_memory());
    for (SlotId s = 0; s < a.slots(); ++s) {
      CHECK(reinterpret_cast<uintptr_t>(a.slot_ptr(s)) % kIoAlignment == 0);
      std::memset(a.slot_ptr(s), static_cast<int>(s + 1), a.slot_bytes());
    }
    CHECK(static_cast<int>(a.slot_ptr(7)[a.slot_bytes() - 1]) == 8);
    CHECK(a.export_ipc().status().code() == StatusCode::kUnavailable);
    CHECK(arena_bytes_outstanding() == before + a.size_bytes());
  }
  CHECK(arena_bytes_outstanding() == before);
}

TEST_CASE("A shared host arena's memfd maps the same bytes") {
  auto arena = create_host_arena({.slot_bytes = 4096, .slots = 4, .shared = true});
  REQUIRE(arena.is_ok());
  auto& a = **arena;
  REQUIRE(a.memfd() >= 0);
  std::memcpy(a.slot_ptr(3), "kvtier", 6);
  void* other = mmap(nullptr, a.size_bytes(), PROT_READ, MAP_SHARED, a.memfd(), 0);
  REQUIRE(other != MAP_FAILED);
  CHECK(std::memcmp(static_cast<std::byte*>(other) + 3 * 4096, "kvtier", 6) == 0);
  munmap(other, a.size_bytes());
}

TEST_CASE("Arenas refuse empty or overflowing shapes") {
  CHECK(create_host_arena({.slot_bytes = 0, .slots = 4}).status().code() == StatusCode::kInvalidArgument);
  CHECK(create_host_arena({.slot_bytes = 4096, .slots = 0}).status().code() == StatusCode::kInvalidArgument);
  CHECK(create_hbm_arena({.slot_bytes = 1ull << 40, .slots = 1ull << 40}).status().code() ==
        StatusCode::kInvalidArgument);
}

TEST_CASE("Without a GPU the HBM arena is emulated in host memory, or refused when asked") {
  auto arena = create_hbm_arena({.slot_bytes = 8192, .slots = 4});
  REQUIRE(arena.is_ok());
  CHECK((*arena)->is_hbm());
  if ((*arena)->kind() == ArenaKind::kHbmEmulated) {
    std::memset((*arena)->slot_ptr(3), 0x5a, 8192);  // host memory: writable from the CPU
    CHECK(create_hbm_arena({.slot_bytes = 8192, .slots = 4, .allow_emulated = false}).status().code() ==
          StatusCode::kUnavailable);
  } else {
    WARN("a GPU: the arena is cudaMalloc memory, so the emulated path is not checked here");
    CHECK((*arena)->kind() == ArenaKind::kHbmCuda);
    CHECK((*arena)->is_device_memory());
  }
}
