// Pack/unpack against index formulas written out independently here, for vLLM, FlashInfer NHD
// and HND and vLLM's CPU backend (K transposed), pages of one and of two blocks, shuffled slots
// and block pieces, a sub-range of layers, and unpack∘pack round trips that leave every other
// byte of the destination untouched.
#include <catch2/catch.hpp>

#include <cstring>
#include <numeric>

#include "kernel_test_support.h"
#include "kernels/page_pack.h"

using namespace kvtier;
using namespace kvtier::kernels;
using namespace kvtier::kernels::testing;

namespace {
// Element index inside one layer's engine tensor of pages of PT tokens, spelled out per layout.
uint64_t engine_elem(EngineLayout e, uint32_t pages, uint32_t PT, uint32_t Hk, uint32_t D,
                     uint32_t page, uint32_t plane, uint32_t t, uint32_t h, uint32_t d) {
  switch (e) {
    case EngineLayout::kVllm:  // [2][pages][PT][Hk][D]
      return (((uint64_t(plane) * pages + page) * PT + t) * Hk + h) * D + d;
    case EngineLayout::kFlashInferNhd:  // [pages][2][PT][Hk][D]
      return (((uint64_t(page) * 2 + plane) * PT + t) * Hk + h) * D + d;
    case EngineLayout::kFlashInferHnd:  // [pages][2][Hk][PT][D]
      return (((uint64_t(page) * 2 + plane) * Hk + h) * PT + t) * D + d;
    case EngineLayout::kVllmCpu: {  // [pages][Hk][PT*2*D]: K as [D][PT], then V as [PT][D]
      const uint64_t slice = (uint64_t(page) * Hk + h) * PT * 2 * D;
      return plane == 0 ? slice + uint64_t(d) * PT + t : slice + uint64_t(PT) * D + uint64_t(t) * D + d;
    }
  }
  return 0;
}
}  // namespace

TEST_CASE("Pack and unpack between engine pages and canonical blocks") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (EngineLayout engine : {EngineLayout::kVllm, EngineLayout::kFlashInferNhd, EngineLayout::kFlashInferHnd,
                              EngineLayout::kVllmCpu}) {
    for (uint32_t per_page : {1u, 2u}) {  // blocks per engine page
      for (Dtype dtype : {Dtype::kBf16, Dtype::kInt8, Dtype::kFp32}) {
        CAPTURE(int(engine), per_page, dtype_name(dtype));
        const uint32_t L = 3, Hk = 2, D = 64, T = 16, pages = 9, slots = 11, nblocks = 5;
        const uint32_t PT = T * per_page, pieces = pages * per_page;
        auto layout = KvLayout::standard(L, Hk, D, dtype, T);
        REQUIRE(layout.is_ok());
        const uint32_t eb = dtype_bits(dtype) / 8;
        const uint64_t layer_bytes = uint64_t(2) * pages * PT * Hk * D * eb;
        std::vector<std::vector<uint8_t>> engine_src(L, std::vector<uint8_t>(layer_bytes));
        for (auto& l : engine_src) rng.fill_bytes(l);
        std::vector<uint8_t> arena(slots * layout->bytes_per_block());
        rng.fill_bytes(arena);
        const std::vector<uint8_t> arena_before = arena;

        std::vector<int32_t> slot_ids(slots), piece_ids(pieces);
        std::iota(slot_ids.begin(), slot_ids.end(), 0);
        std::iota(piece_ids.begin(), piece_ids.end(), 0);
        std::shuffle(slot_ids.begin(), slot_ids.end(), rng.gen);
        std::shuffle(piece_ids.begin(), piece_ids.end(), rng.gen);
        slot_ids.resize(nblocks);
        piece_ids.resize(nblocks);
        std::vector<void*> bases(L);
        for (uint32_t l = 0; l < L; ++l) bases[l] = engine_src[l].data();
        // Element of (block b, plane, token t of the block, head, dim) in an engine tensor.
        auto engine_at = [&](uint32_t b, uint32_t plane, uint32_t t, uint32_t h, uint32_t d) {
          const uint32_t piece = uint32_t(piece_ids[b]);
          return engine_elem(engine, pages, PT, Hk, D, piece / per_page, plane, piece % per_page * T + t, h, d) * eb;
        };

        PagePackArgs args;
        args.layout = *layout;
        args.arena = arena.data();
        args.num_slots = slots;
        args.engine = engine;
        args.layer_base = bases.data();
        args.engine_num_pages = pages;
        args.page_tokens = per_page == 1 ? 0 : PT;
        args.arena_slots = slot_ids.data();
        args.engine_pages = piece_ids.data();
        args.num_blocks = nblocks;
        args.layer_begin = 1;  // layers 1..2 only: layer 0 of every slot stays untouched
        args.layer_count = 2;
        REQUIRE(pack_pages_cpu(args).is_ok());

        for (uint32_t b = 0; b < nblocks; ++b) {
          for (uint32_t l = 0; l < L; ++l) {
            for (uint32_t plane = 0; plane < 2; ++plane) {
              for (uint32_t t = 0; t < T; ++t) {
                for (uint32_t h = 0; h < Hk; ++h) {
                  for (uint32_t d = 0; d < D; ++d) {
                    const uint64_t at = uint64_t(slot_ids[b]) * layout->bytes_per_block() +
                                        (((uint64_t(l) * 2 + plane) * T + t) * Hk + h) * D * eb + d * eb;
                    const uint8_t* want = l == 0 ? &arena_before[at] : &engine_src[l][engine_at(b, plane, t, h, d)];
                    if (std::memcmp(&arena[at], want, eb) != 0) {
                      INFO("block " << b << " layer " << l << " plane " << plane << " t " << t << " h " << h);
                      REQUIRE(std::memcmp(&arena[at], want, eb) == 0);
                    }
                  }
                }
              }
            }
          }
        }
        // Slots not in the batch are untouched.
        for (uint32_t s = 0; s < slots; ++s) {
          if (std::find(slot_ids.begin(), slot_ids.end(), int32_t(s)) != slot_ids.end()) continue;
          const uint64_t off = uint64_t(s) * layout->bytes_per_block();
          REQUIRE(std::memcmp(&arena[off], &arena_before[off], layout->bytes_per_block()) == 0);
        }

        // Round trip: unpack the packed slots into a fresh engine cache at the same pieces. The
        // expected tensors are the fresh ones with exactly the moved elements taken from the source.
        std::vector<std::vector<uint8_t>> engine_dst(L, std::vector<uint8_t>(layer_bytes));
        for (auto& l : engine_dst) rng.fill_bytes(l);
        auto expect = engine_dst;
        for (uint32_t l = 1; l < L; ++l) {
          for (uint32_t b = 0; b < nblocks; ++b) {
            for (uint32_t plane = 0; plane < 2; ++plane) {
              for (uint32_t t = 0; t < T; ++t) {
                for (uint32_t h = 0; h < Hk; ++h) {
                  for (uint32_t d = 0; d < D; ++d) {
                    const uint64_t at = engine_at(b, plane, t, h, d);
                    std::memcpy(&expect[l][at], &engine_src[l][at], eb);
                  }
                }
              }
            }
          }
        }
        for (uint32_t l = 0; l < L; ++l) bases[l] = engine_dst[l].data();
        REQUIRE(unpack_pages_cpu(args).is_ok());
        for (uint32_t l = 0; l < L; ++l) REQUIRE(engine_dst[l] == expect[l]);
      }
    }
  }
}

TEST_CASE("Pack refuses pages that are not whole blocks, and pieces past the pages") {
  auto layout = KvLayout::standard(1, 1, 64, Dtype::kFp16, 16);
  std::vector<uint8_t> arena(layout->bytes_per_block()), engine(layout->bytes_per_block() * 4);
  void* bases[1] = {engine.data()};
  int32_t slot = 0, piece = 3;
  PagePackArgs args;
  args.layout = *layout;
  args.arena = arena.data();
  args.num_slots = 1;
  args.engine = EngineLayout::kVllmCpu;
  args.layer_base = bases;
  args.engine_num_pages = 2;
  args.page_tokens = 24;  // not a multiple of 16
  args.arena_slots = &slot;
  args.engine_pages = &piece;
  args.num_blocks = 1;
  Status st = pack_pages_cpu(args);
  CHECK(st.code() == StatusCode::kInvalidArgument);
  CHECK(st.message().find("not whole blocks") != std::string_view::npos);
  args.page_tokens = 32;  // 2 pages × 2 pieces: piece 3 is the last
  CHECK(pack_pages_cpu(args).is_ok());
  piece = 4;
  CHECK(unpack_pages_cpu(args).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Pack refuses out-of-range slots, pages and layers") {
  auto layout = KvLayout::standard(2, 1, 64, Dtype::kFp16);
  std::vector<uint8_t> arena(layout->bytes_per_block() * 2), engine(layout->bytes_per_block() * 2);
  void* bases[2] = {engine.data(), engine.data()};
  int32_t slot = 2, page = 0;
  PagePackArgs args;
  args.layout = *layout;
  args.arena = arena.data();
  args.num_slots = 2;
  args.layer_base = bases;
  args.engine_num_pages = 1;
  args.arena_slots = &slot;
  args.engine_pages = &page;
  args.num_blocks = 1;
  CHECK(pack_pages_cpu(args).code() == StatusCode::kInvalidArgument);
  slot = 1;
  CHECK(pack_pages_cpu(args).is_ok());
  page = 1;
  CHECK_FALSE(unpack_pages_cpu(args).is_ok());
  page = 0;
  args.layer_begin = 1;
  args.layer_count = 2;
  CHECK_FALSE(pack_pages_cpu(args).is_ok());
}
