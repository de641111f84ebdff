// kernels_gpu_check: runs every CUDA kernel against its CPU reference on the same random data,
// with device outputs poisoned (0xff bytes: NaN in fp16/bf16/fp32) before each run so unwritten
// elements show; optionally dumps cases for the PyTorch SDPA comparison
// (bench/kernels/torch_sdpa_check.py); then prints the benchmark table last, each figure as a
// ratio to a device-to-device copy measured in the same run.
//
//   usage: kernels_gpu_check [--dump DIR] [--quick] [--checks-only | --bench-only]
//   rerun: scripts/gpu_check.sh
// Exit: 0 all passed (or no GPU: "skipped"), 1 a check failed, 2 a CUDA error.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kernel_test_support.h"
#include "kernels/cuda/kernels_cuda.h"
#include "kernels/page_packer.h"

using namespace kvtier;
using namespace kvtier::kernels;
using namespace kvtier::kernels::testing;

namespace {

int g_failures = 0;
std::string g_dump_dir;

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (expr);                                                            \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, \
                   __LINE__, #expr);                                                    \
      std::exit(2);                                                                     \
    }                                                                                   \
  } while (0)

#define STATUS_OK(expr)                                                                   \
  do {                                                                                    \
    Status s_ = (expr);                                                                   \
    if (!s_.is_ok()) {                                                                    \
      std::fprintf(stderr, "status error at %s:%d: %s\n", __FILE__, __LINE__, s_.to_string().c_str()); \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

/// A device copy of a host vector; poisoned (0xff) when `poison`.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&ptr), std::max<size_t>(n, 1) * sizeof(T))); }
  explicit DeviceBuffer(const std::vector<T>& v) : DeviceBuffer(v.size()) { upload(v); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& v) { CUDA_OK(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  // Synchronised: a non-blocking stream (the page packer's) is not ordered after the default stream.
  void poison() {
    CUDA_OK(cudaMemset(ptr, 0xff, n * sizeof(T)));
    CUDA_OK(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> v(n);
    CUDA_OK(cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
};

void report(const std::string& name, bool ok, const std::string& detail) {
  std::printf("  [%s] %-58s %s\n", ok ? " ok " : "FAIL", name.c_str(), detail.c_str());
  if (!ok) ++g_failures;
}

double to_double(uint16_t bits, Dtype d) { return d == Dtype::kFp16 ? fp16_to_float(bits) : bf16_to_float(bits); }

/// Compares 16-bit outputs: no NaN, and within attention_tolerance of the CPU output (scaled by
/// `vmax`, the largest |V|; the two round independently, so twice the per-dtype tolerance).
bool compare16(const std::vector<uint16_t>& gpu, const std::vector<uint16_t>& cpu, Dtype d, double vmax,
               std::string& detail) {
  double worst = 0;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const double g = to_double(gpu[i], d), c = to_double(cpu[i], d);
    if (std::isnan(g)) {
      detail = "element " + std::to_string(i) + " not written (NaN)";
      return false;
    }
    worst = std::max(worst, std::fabs(g - c) / (2 * attention_tolerance(d, c, vmax)));
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "max err %.3f of tolerance", worst);
  detail = buf;
  return worst <= 1.0;
}

void write_file(const std::string& name, const void* data, size_t bytes) {
  std::ofstream(g_dump_dir + "/" + name, std::ios::binary).write(static_cast<const char*>(data), std::streamsize(bytes));
}

// Gathered, contiguous 16-bit K or V of sequence s: [len][kv_heads][D].
std::vector<uint16_t> gather16(const PagedFixture& f, uint32_t s, uint32_t plane) {
  const uint32_t Hk = f.layout.num_kv_heads, D = f.layout.head_dim, len = uint32_t(f.lens[s]);
  std::vector<uint16_t> out(uint64_t(len) * Hk * D);
  for (uint32_t t = 0; t < len; ++t)
    for (uint32_t h = 0; h < Hk; ++h)
      for (uint32_t d = 0; d < D; ++d) {
        const float v = float(f.at(s, plane, t, h, d));
        out[(uint64_t(t) * Hk + h) * D + d] = f.layout.dtype == Dtype::kFp16 ? float_to_fp16(v) : float_to_bf16(v);
      }
  return out;
}

// ---- correctness -----------------------------------------------------------------------------
void check_decode(Rng& rng, Dtype qd, Dtype kvd, uint32_t D, uint32_t KH, uint32_t H,
                  std::vector<int32_t> lens, uint32_t force_splits, const std::string& dump_name) {
  auto layout = KvLayout::standard(2, KH, D, kvd);
  PagedFixture f = make_paged(*layout, 1, lens, rng);
  const uint32_t S = uint32_t(lens.size());
  std::vector<uint16_t> q;
  random_activations(q, uint64_t(S) * H * D, qd, rng);
  std::vector<uint16_t> out_cpu(q.size(), 0x7e00);
  DecodeAttentionArgs cpu{f.kv, q.data(), out_cpu.data(), qd, H, 0.0f};
  DecodePlanOptions opt;
  opt.force_splits = force_splits;
  auto sms = current_device_sm_count();
  if (sms.is_ok()) opt.num_sms = *sms;
  const uint32_t max_len = uint32_t(*std::max_element(lens.begin(), lens.end()));
  auto plan = plan_decode_attention(cpu, max_len, opt);
  STATUS_OK(plan.status());
  std::vector<float> ws(plan->workspace_bytes / 4 + 1);
  STATUS_OK(decode_attention_cpu(cpu, *plan, {ws.data(), plan->workspace_bytes}));

  DeviceBuffer<uint8_t> arena(f.arena);
  DeviceBuffer<float> scales(f.scales.empty() ? std::vector<float>{0.0f} : f.scales);
  DeviceBuffer<int32_t> table(f.table), dlens(f.lens);
  DeviceBuffer<uint16_t> dq(q), dout(q.size());
  DeviceBuffer<float> dws(ws.size());
  dout.poison();
  dws.poison();
  auto kv = PagedKv::create(*layout, 1, {arena.ptr, f.num_slots, 0, f.scales.empty() ? nullptr : scales.ptr, 0},
                            {table.ptr, f.max_blocks, dlens.ptr, S});
  STATUS_OK(kv.status());
  DecodeAttentionArgs gpu{*kv, dq.ptr, dout.ptr, qd, H, 0.0f};
  STATUS_OK(decode_attention_cuda(gpu, *plan, {dws.ptr, plan->workspace_bytes}, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto out_gpu = dout.download();
  double vmax = 0;
  for (const auto& v : f.values) for (double x : v) vmax = std::max(vmax, std::fabs(x));
  std::string detail;
  const bool ok = compare16(out_gpu, out_cpu, qd, vmax, detail);
  char name[160];
  std::snprintf(name, sizeof name, "decode q=%s kv=%s D=%u heads=%u/%u splits=%u", std::string(dtype_name(qd)).c_str(),
                std::string(dtype_name(kvd)).c_str(), D, H, KH, plan->num_splits);
  report(name, ok, detail);
  if (!g_dump_dir.empty() && !dump_name.empty() && !is_quantized_kv(kvd)) {
    // Equal lengths only: torch SDPA on [S][KH][len][D].
    std::vector<uint16_t> k, v;
    for (uint32_t s = 0; s < S; ++s) {
      auto ks = gather16(f, s, 0), vs = gather16(f, s, 1);
      k.insert(k.end(), ks.begin(), ks.end());
      v.insert(v.end(), vs.begin(), vs.end());
    }
    write_file(dump_name + ".q", q.data(), q.size() * 2);
    write_file(dump_name + ".k", k.data(), k.size() * 2);
    write_file(dump_name + ".v", v.data(), v.size() * 2);
    write_file(dump_name + ".out", out_gpu.data(), out_gpu.size() * 2);
    std::ofstream(g_dump_dir + "/" + dump_name + ".meta")
        << "kind=decode\ndtype=" << dtype_name(qd) << "\nS=" << S << "\nH=" << H << "\nKH=" << KH
        << "\nD=" << D << "\nlen=" << lens[0] << "\n";
  }
}

void check_prefill(Rng& rng, Dtype qd, Dtype kvd, uint32_t D, uint32_t KH, uint32_t H,
                   std::vector<int32_t> prefix, std::vector<int32_t> n_new, const std::string& dump_name) {
  auto layout = KvLayout::standard(2, KH, D, kvd);
  PagedFixture f = make_paged(*layout, 0, prefix, rng);
  const uint32_t S = uint32_t(prefix.size());
  std::vector<int32_t> indptr(S + 1, 0);
  for (uint32_t s = 0; s < S; ++s) indptr[s + 1] = indptr[s] + n_new[s];
  const uint32_t N = uint32_t(indptr[S]);
  std::vector<uint16_t> q, k, v;
  random_activations(q, uint64_t(N) * H * D, qd, rng);
  random_activations(k, uint64_t(N) * KH * D, qd, rng);
  random_activations(v, uint64_t(N) * KH * D, qd, rng);
  std::vector<uint16_t> out_cpu(q.size());
  STATUS_OK(prefill_attention_cpu({f.kv, q.data(), k.data(), v.data(), out_cpu.data(), indptr.data(), N, qd, H, 0.0f}));
  DeviceBuffer<uint8_t> arena(f.arena);
  DeviceBuffer<float> scales(f.scales.empty() ? std::vector<float>{0.0f} : f.scales);
  DeviceBuffer<int32_t> table(f.table), dlens(f.lens), dindptr(indptr);
  DeviceBuffer<uint16_t> dq(q), dk(k), dv(v), dout(q.size());
  dout.poison();
  auto kv = PagedKv::create(*layout, 0, {arena.ptr, f.num_slots, 0, f.scales.empty() ? nullptr : scales.ptr, 0},
                            {table.ptr, f.max_blocks, dlens.ptr, S});
  STATUS_OK(kv.status());
  STATUS_OK(prefill_attention_cuda({*kv, dq.ptr, dk.ptr, dv.ptr, dout.ptr, dindptr.ptr, N, qd, H, 0.0f}, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto out_gpu = dout.download();
  double vmax = 1.0;  // new V are in [-1, 1]
  for (const auto& vals : f.values) for (double x : vals) vmax = std::max(vmax, std::fabs(x));
  std::string detail;
  const bool ok = compare16(out_gpu, out_cpu, qd, vmax, detail);
  char name[160];
  std::snprintf(name, sizeof name, "prefill q=%s kv=%s D=%u heads=%u/%u new=%u", std::string(dtype_name(qd)).c_str(),
                std::string(dtype_name(kvd)).c_str(), D, H, KH, N);
  report(name, ok, detail);
  if (!g_dump_dir.empty() && !dump_name.empty() && S == 1 && !is_quantized_kv(kvd)) {
    auto kf = gather16(f, 0, 0), vf = gather16(f, 0, 1);
    kf.insert(kf.end(), k.begin(), k.end());
    vf.insert(vf.end(), v.begin(), v.end());
    write_file(dump_name + ".q", q.data(), q.size() * 2);
    write_file(dump_name + ".k", kf.data(), kf.size() * 2);
    write_file(dump_name + ".v", vf.data(), vf.size() * 2);
    write_file(dump_name + ".out", out_gpu.data(), out_gpu.size() * 2);
    std::ofstream(g_dump_dir + "/" + dump_name + ".meta")
        << "kind=prefill\ndtype=" << dtype_name(qd) << "\nS=1\nH=" << H << "\nKH=" << KH << "\nD=" << D
        << "\nprefix=" << prefix[0] << "\nnew=" << N << "\n";
  }
}

void check_pack(Rng& rng, EngineLayout engine, const char* engine_name) {
  const uint32_t L = 3, Hk = 4, D = 128, T = 16, pages = 12, slots = 14, nblocks = 7;
  auto layout = KvLayout::standard(L, Hk, D, Dtype::kBf16, T);
  const uint64_t layer_bytes = uint64_t(2) * pages * T * Hk * D * 2;
  std::vector<std::vector<uint8_t>> eng(L, std::vector<uint8_t>(layer_bytes));
  for (auto& e : eng) rng.fill_bytes(e);
  std::vector<int32_t> slot_ids(slots), page_ids(pages);
  std::iota(slot_ids.begin(), slot_ids.end(), 0);
  std::iota(page_ids.begin(), page_ids.end(), 0);
  std::shuffle(slot_ids.begin(), slot_ids.end(), rng.gen);
  std::shuffle(page_ids.begin(), page_ids.end(), rng.gen);
  slot_ids.resize(nblocks);
  page_ids.resize(nblocks);
  std::vector<uint8_t> arena_cpu(slots * layout->bytes_per_block(), 0xff);
  std::vector<void*> bases(L);
  for (uint32_t l = 0; l < L; ++l) bases[l] = eng[l].data();
  PagePackArgs a{*layout, arena_cpu.data(), 0, slots, engine, bases.data(), pages, slot_ids.data(),
                 page_ids.data(), nblocks, 0, 0};
  STATUS_OK(pack_pages_cpu(a));

  std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> deng;
  std::vector<void*> dbases(L);
  for (uint32_t l = 0; l < L; ++l) {
    deng.emplace_back(new DeviceBuffer<uint8_t>(eng[l]));
    dbases[l] = deng[l]->ptr;
  }
  DeviceBuffer<void*> dbase_arr(dbases);
  DeviceBuffer<int32_t> dslots(slot_ids), dpages(page_ids);
  DeviceBuffer<uint8_t> darena(arena_cpu.size());
  darena.poison();  // same 0xff the CPU arena started from
  PagePackArgs g = a;
  g.arena = darena.ptr;
  g.layer_base = dbase_arr.ptr;
  g.arena_slots = dslots.ptr;
  g.engine_pages = dpages.ptr;
  STATUS_OK(pack_pages_cuda(g, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  report(std::string("pack ") + engine_name, darena.download() == arena_cpu, "bytes equal");

  // Unpack into poisoned engine tensors; CPU does the same from 0xff.
  std::vector<std::vector<uint8_t>> eng_cpu(L, std::vector<uint8_t>(layer_bytes, 0xff));
  for (uint32_t l = 0; l < L; ++l) bases[l] = eng_cpu[l].data();
  STATUS_OK(unpack_pages_cpu(a));
  for (auto& d : deng) d->poison();
  STATUS_OK(unpack_pages_cuda(g, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  bool same = true;
  for (uint32_t l = 0; l < L; ++l) same = same && deng[l]->download() == eng_cpu[l];
  report(std::string("unpack ") + engine_name, same, "bytes equal");
}

/// The CUDA page packer (the path a store or client takes for paged KV in GPU memory): canonical
/// blocks in host memory staged two blocks at a time, a layer sub-range, shuffled slots; and an
/// unpack from a device arena with a table of two blocks per launch. Each against the CPU reference.
void check_packer(Rng& rng, EngineLayout engine, const char* engine_name) {
  const uint32_t L = 4, Hk = 8, D = 128, T = 16, pages = 12, slots = 14, nblocks = 9;
  auto layout = KvLayout::standard(L, Hk, D, Dtype::kBf16, T);
  const uint64_t layer_bytes = uint64_t(2) * pages * T * Hk * D * 2;
  std::vector<std::vector<uint8_t>> eng(L, std::vector<uint8_t>(layer_bytes));
  for (auto& e : eng) rng.fill_bytes(e);
  std::vector<int32_t> slot_ids(slots), page_ids(pages);
  std::iota(slot_ids.begin(), slot_ids.end(), 0);
  std::iota(page_ids.begin(), page_ids.end(), 0);
  std::shuffle(slot_ids.begin(), slot_ids.end(), rng.gen);
  std::shuffle(page_ids.begin(), page_ids.end(), rng.gen);
  slot_ids.resize(nblocks);
  page_ids.resize(nblocks);
  std::vector<uint8_t> arena(slots * layout->bytes_per_block());
  rng.fill_bytes(arena);
  std::vector<void*> bases(L);
  for (uint32_t l = 0; l < L; ++l) bases[l] = eng[l].data();
  PagePackArgs a{*layout, arena.data(), 0, slots, engine, bases.data(), pages, slot_ids.data(),
                 page_ids.data(), nblocks, 1, 2};

  std::vector<std::unique_ptr<DeviceBuffer<uint8_t>>> deng;
  std::vector<void*> dbases(L);
  for (uint32_t l = 0; l < L; ++l) {
    deng.emplace_back(new DeviceBuffer<uint8_t>(eng[l]));
    dbases[l] = deng[l]->ptr;
  }
  auto packer = create_cuda_page_packer({.staging_bytes = 2 * 2 * layout->bytes_per_block_layer(),
                                         .table_bytes = L * sizeof(void*) + 2 * 2 * sizeof(int32_t)});
  auto lane = packer->acquire();
  STATUS_OK(lane.status());

  // pack_to_host: layers 1..2 of the batch's slots from the engine tensors, the rest untouched.
  std::vector<uint8_t> arena_gpu = arena;
  PagePackArgs g = a;
  g.arena = arena_gpu.data();
  g.layer_base = dbases.data();
  STATUS_OK(pack_pages_cpu(a));
  STATUS_OK(lane->pack_to_host(g));
  report(std::string("packer pack_to_host ") + engine_name, arena_gpu == arena, "bytes equal");

  // unpack_from_host into poisoned tensors; the CPU does the same from 0xff.
  std::vector<std::vector<uint8_t>> eng_cpu(L, std::vector<uint8_t>(layer_bytes, 0xff));
  for (uint32_t l = 0; l < L; ++l) bases[l] = eng_cpu[l].data();
  STATUS_OK(unpack_pages_cpu(a));
  for (auto& d : deng) d->poison();
  STATUS_OK(lane->unpack_from_host(g));
  bool same = true;
  for (uint32_t l = 0; l < L; ++l) same = same && deng[l]->download() == eng_cpu[l];
  report(std::string("packer unpack_from_host ") + engine_name, same, "bytes equal");

  // unpack_device: the arena in device memory, every layer, two blocks per launch.
  DeviceBuffer<uint8_t> darena(arena);
  for (auto& d : deng) d->poison();
  for (auto& e : eng_cpu) std::fill(e.begin(), e.end(), 0xff);
  a.layer_begin = 0;
  a.layer_count = 0;
  STATUS_OK(unpack_pages_cpu(a));
  g = a;
  g.arena = darena.ptr;
  g.layer_base = dbases.data();
  STATUS_OK(lane->unpack_device(g));
  same = true;
  for (uint32_t l = 0; l < L; ++l) same = same && deng[l]->download() == eng_cpu[l];
  report(std::string("packer unpack_device ") + engine_name, same, "bytes equal");

  // pack_device: the engine tensors (now equal to eng_cpu) into a fresh random arena in device
  // memory, every layer: the slots of the batch change, the others keep their bytes.
  std::vector<uint8_t> fresh(arena.size());
  rng.fill_bytes(fresh);
  DeviceBuffer<uint8_t> dfresh(fresh);
  a.arena = fresh.data();
  STATUS_OK(pack_pages_cpu(a));
  g.arena = dfresh.ptr;
  STATUS_OK(lane->pack_device(g));
  report(std::string("packer pack_device ") + engine_name, dfresh.download() == fresh, "bytes equal");
}

void check_quant(Rng& rng, Dtype wide, Dtype narrow) {
  const uint32_t L = 2, Hk = 8, D = 128, slots = 6;
  auto layout = KvLayout::standard(L, Hk, D, wide);
  std::vector<uint16_t> w(slots * layout->bytes_per_block() / 2);
  for (uint64_t r = 0; r < w.size() / D; ++r) {
    const float mag = std::pow(10.0f, rng.uniform(-3.0f, 2.0f));
    for (uint32_t d = 0; d < D; ++d) put16(w, r * D + d, wide, rng.nonzero() * mag);
  }
  std::vector<int32_t> ws{4, 1, 5, 0}, ns{0, 3, 2, 5};
  // Both sides start from 0xff bytes (NaN scales), so unwritten codes or scales differ.
  std::vector<uint8_t> n_cpu(slots * layout->bytes_per_block() / 2, 0xff);
  std::vector<float> s_cpu(slots * kv_scales_per_block(*layout));
  std::memset(s_cpu.data(), 0xff, s_cpu.size() * 4);
  KvQuantArgs a{*layout, narrow, w.data(), 0, n_cpu.data(), 0, s_cpu.data(), 0, ws.data(), ns.data(), 4, slots, slots};
  STATUS_OK(quantize_kv_cpu(a));
  DeviceBuffer<uint16_t> dw(w);
  DeviceBuffer<uint8_t> dn(n_cpu.size());
  DeviceBuffer<float> dsc(s_cpu.size());
  DeviceBuffer<int32_t> dws(ws), dns(ns);
  dn.poison();
  dsc.poison();
  KvQuantArgs g{*layout, narrow, dw.ptr, 0, dn.ptr, 0, dsc.ptr, 0, dws.ptr, dns.ptr, 4, slots, slots};
  STATUS_OK(quantize_kv_cuda(g, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::string tag = std::string(dtype_name(wide)) + "->" + std::string(dtype_name(narrow));
  const auto dsc_host = dsc.download();
  report("quantize " + tag, dn.download() == n_cpu &&
                                std::memcmp(dsc_host.data(), s_cpu.data(), s_cpu.size() * 4) == 0,
         "codes and scales bit-equal");
  std::vector<uint16_t> back_cpu(w.size(), 0xffff);
  a.wide_arena = back_cpu.data();
  STATUS_OK(dequantize_kv_cpu(a));
  dw.poison();
  STATUS_OK(dequantize_kv_cuda(g, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  report("dequantize " + tag, dw.download() == back_cpu, "bit-equal");
}

// ---- benchmarks --------------------------------------------------------------------------------
struct Row {
  std::string what;
  std::string figure;
  std::string ratio;
};
std::vector<Row> g_rows;

/// Launches timed back to back per sample: the host's launch cost overlaps the device's work,
/// as in a serving loop, instead of adding to each launch (METHOD: many small launches).
constexpr int kBatch = 20;

/// Median over `reps` samples of the device time per launch, each sample kBatch launches between
/// two events.
template <typename F>
float median_ms(F&& launch, int reps = 10) {
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  launch();  // warm-up
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CUDA_OK(cudaEventRecord(a));
    for (int k = 0; k < kBatch; ++k) launch();
    CUDA_OK(cudaEventRecord(b));
    CUDA_OK(cudaEventSynchronize(b));
    float t = 0;
    CUDA_OK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / kBatch);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::string fmt(const char* f, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, x);
  return buf;
}

/// HBM limit: a 1 GiB device-to-device copy, counted as bytes read + bytes written per second.
double measure_d2d() {
  const size_t bytes = size_t(1) << 30;
  DeviceBuffer<uint8_t> a(bytes), b(bytes);
  const float ms = median_ms([&] { CUDA_OK(cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice)); });
  const double bw = 2.0 * bytes / (ms * 1e-3);
  g_rows.push_back({"D2D cudaMemcpy 1 GiB (read+write)", fmt("%.0f GB/s", bw / 1e9), "1.00 (limit)"});
  return bw;
}


/// Device arena of `slots` blocks filled with a constant, harmless pattern (timing only), and a
/// shuffled block table for one sequence per row.
struct BenchKv {
  std::unique_ptr<DeviceBuffer<uint8_t>> arena;
  std::unique_ptr<DeviceBuffer<float>> scales;
  std::unique_ptr<DeviceBuffer<int32_t>> table, lens;
  PagedKv kv;
};

BenchKv make_bench_kv(const KvLayout& layout, uint32_t S, uint32_t len, Rng& rng) {
  BenchKv b;
  const uint32_t blocks_per_seq = (len + layout.block_tokens - 1) / layout.block_tokens;
  const uint32_t slots = S * blocks_per_seq;
  b.arena.reset(new DeviceBuffer<uint8_t>(uint64_t(slots) * layout.bytes_per_block()));
  CUDA_OK(cudaMemset(b.arena->ptr, 0x3c, b.arena->n));  // bf16/fp16/fp8/int8: small finite values
  const bool quantized = is_quantized_kv(layout.dtype);
  b.scales.reset(new DeviceBuffer<float>(quantized ? uint64_t(slots) * kv_scales_per_block(layout) : 1));
  CUDA_OK(cudaMemset(b.scales->ptr, 0x3c, b.scales->n * 4));
  std::vector<int32_t> order(slots);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng.gen);  // blocks scattered over the arena
  b.table.reset(new DeviceBuffer<int32_t>(order));
  b.lens.reset(new DeviceBuffer<int32_t>(std::vector<int32_t>(S, int32_t(len))));
  auto kv = PagedKv::create(layout, 0, {b.arena->ptr, slots, 0, quantized ? b.scales->ptr : nullptr, 0},
                            {b.table->ptr, blocks_per_seq, b.lens->ptr, S});
  STATUS_OK(kv.status());
  b.kv = *kv;
  return b;
}

/// Times one decode shape with the planned split count, or `force_splits`; `tsv` (the rows
/// torch_sdpa_check.py times SDPA on) is null for the forced rows, which say so.
void bench_decode(double d2d, Rng& rng, Dtype kvd, uint32_t S, uint32_t len, std::ofstream* tsv,
                  uint32_t force_splits = 0) {
  const uint32_t KH = 8, H = 32, D = 128;
  auto layout = KvLayout::standard(1, KH, D, kvd);
  BenchKv b = make_bench_kv(*layout, S, len, rng);
  DeviceBuffer<uint16_t> q(uint64_t(S) * H * D), out(uint64_t(S) * H * D);
  CUDA_OK(cudaMemset(q.ptr, 0x3c, q.n * 2));
  DecodeAttentionArgs args{b.kv, q.ptr, out.ptr, Dtype::kBf16, H, 0.0f};
  DecodePlanOptions opt;
  opt.num_sms = *current_device_sm_count();
  opt.force_splits = force_splits;
  auto plan = plan_decode_attention(args, len, opt);
  STATUS_OK(plan.status());
  DeviceBuffer<uint8_t> ws(plan->workspace_bytes);
  const float ms = median_ms([&] { STATUS_OK(decode_attention_cuda(args, *plan, {ws.ptr, plan->workspace_bytes}, nullptr)); });
  double bytes = double(S) * len * KH * D * 2 * (dtype_bits(kvd) / 8);
  if (is_quantized_kv(kvd)) bytes += double(S) * len * KH * 2 * 4;
  const double bw = bytes / (ms * 1e-3);
  char what[128];
  std::snprintf(what, sizeof what, "decode %s K/V, %u x %uK tok, 32q/8kv x 128, %u splits%s",
                std::string(dtype_name(kvd)).c_str(), S, len / 1024, plan->num_splits,
                force_splits ? " (forced)" : "");
  g_rows.push_back({what, fmt("%.0f GB/s", bw / 1e9) + fmt(" %.3f ms", ms), fmt("%.2f", bw / d2d)});
  if (tsv == nullptr) return;
  *tsv << what << '\t' << S << '\t' << H << '\t' << KH << '\t' << D << '\t' << len << '\t'
      << dtype_name(kvd) << '\t' << ms << '\n';
}

void bench_pack(double d2d, Rng& rng, EngineLayout engine, const char* name) {
  const uint32_t L = 32, KH = 8, D = 128, blocks = 128;
  auto layout = KvLayout::standard(L, KH, D, Dtype::kBf16);
  DeviceBuffer<uint8_t> arena(uint64_t(blocks) * layout->bytes_per_block());
  const uint64_t layer_bytes = layout->bytes_per_block_layer() * blocks;
  DeviceBuffer<uint8_t> engine_mem(layer_bytes * L);
  std::vector<void*> bases(L);
  for (uint32_t l = 0; l < L; ++l) bases[l] = engine_mem.ptr + l * layer_bytes;
  DeviceBuffer<void*> dbases(bases);
  std::vector<int32_t> slots(blocks), pages(blocks);
  std::iota(slots.begin(), slots.end(), 0);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng.gen);
  std::shuffle(pages.begin(), pages.end(), rng.gen);
  DeviceBuffer<int32_t> dslots(slots), dpages(pages);
  PagePackArgs a{*layout, arena.ptr, 0, blocks, engine, dbases.ptr, blocks, dslots.ptr, dpages.ptr, blocks, 0, 0};
  const double moved = 2.0 * arena.n;  // read + write
  const float pack_ms = median_ms([&] { STATUS_OK(pack_pages_cuda(a, nullptr)); });
  const float unpack_ms = median_ms([&] { STATUS_OK(unpack_pages_cuda(a, nullptr)); });
  g_rows.push_back({std::string("pack ") + name + ", 128 blocks x 32 layers (512 MiB)",
                    fmt("%.0f GB/s", moved / (pack_ms * 1e-3) / 1e9), fmt("%.2f", moved / (pack_ms * 1e-3) / d2d)});
  g_rows.push_back({std::string("unpack ") + name + ", 128 blocks x 32 layers (512 MiB)",
                    fmt("%.0f GB/s", moved / (unpack_ms * 1e-3) / 1e9), fmt("%.2f", moved / (unpack_ms * 1e-3) / d2d)});
}

void bench_quant(double d2d, Rng& rng, Dtype narrow) {
  const uint32_t L = 32, KH = 8, D = 128, blocks = 128;
  auto layout = KvLayout::standard(L, KH, D, Dtype::kBf16);
  DeviceBuffer<uint8_t> wide(uint64_t(blocks) * layout->bytes_per_block()), nar(wide.n / 2);
  DeviceBuffer<float> scales(uint64_t(blocks) * kv_scales_per_block(*layout));
  CUDA_OK(cudaMemset(wide.ptr, 0x3c, wide.n));
  std::vector<int32_t> ids(blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng.gen);
  DeviceBuffer<int32_t> dids(ids);
  KvQuantArgs a{*layout, narrow, wide.ptr, 0, nar.ptr, 0, scales.ptr, 0, dids.ptr, dids.ptr, blocks, blocks, blocks};
  const double moved = double(wide.n) + nar.n + scales.n * 4.0;
  const float q_ms = median_ms([&] { STATUS_OK(quantize_kv_cuda(a, nullptr)); });
  const float d_ms = median_ms([&] { STATUS_OK(dequantize_kv_cuda(a, nullptr)); });
  const std::string n(dtype_name(narrow));
  g_rows.push_back({"quantize bf16->" + n + ", 512 MiB", fmt("%.0f GB/s", moved / (q_ms * 1e-3) / 1e9),
                    fmt("%.2f", moved / (q_ms * 1e-3) / d2d)});
  g_rows.push_back({"dequantize " + n + "->bf16, 512 MiB", fmt("%.0f GB/s", moved / (d_ms * 1e-3) / 1e9),
                    fmt("%.2f", moved / (d_ms * 1e-3) / d2d)});
}

/// Attention error with int8/fp8 K/V (quantized on the GPU from bf16) against bf16 K/V, at 4K
/// tokens of random data: max |diff| / max |out| and relative RMS.
void bench_quant_error(Rng& rng) {
  const uint32_t KH = 8, H = 32, D = 128, len = 4096;
  auto wide_layout = KvLayout::standard(1, KH, D, Dtype::kBf16);
  PagedFixture f = make_paged(*wide_layout, 0, {int32_t(len)}, rng, 0);
  std::vector<uint16_t> q;
  random_activations(q, uint64_t(H) * D, Dtype::kBf16, rng);
  DeviceBuffer<uint8_t> wide(f.arena);
  DeviceBuffer<int32_t> table(f.table), lens(f.lens);
  DeviceBuffer<uint16_t> dq(q), out_ref(q.size()), out_q(q.size());
  DeviceBuffer<uint8_t> ws(1 << 24);
  auto run = [&](const PagedKv& kv, DeviceBuffer<uint16_t>& out) {
    DecodeAttentionArgs args{kv, dq.ptr, out.ptr, Dtype::kBf16, H, 0.0f};
    auto plan = plan_decode_attention(args, len);
    STATUS_OK(plan.status());
    STATUS_OK(decode_attention_cuda(args, *plan, {ws.ptr, ws.n}, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
  };
  auto kv_ref = PagedKv::create(*wide_layout, 0, {wide.ptr, f.num_slots}, {table.ptr, f.max_blocks, lens.ptr, 1});
  STATUS_OK(kv_ref.status());
  run(*kv_ref, out_ref);
  const auto ref = out_ref.download();
  for (Dtype narrow : {Dtype::kInt8, Dtype::kFp8E4M3}) {
    auto nl = KvLayout::standard(1, KH, D, narrow);
    DeviceBuffer<uint8_t> nar(f.arena.size() / 2);
    DeviceBuffer<float> scales(uint64_t(f.num_slots) * kv_scales_per_block(*nl));
    std::vector<int32_t> ids(f.num_slots);
    std::iota(ids.begin(), ids.end(), 0);
    DeviceBuffer<int32_t> dids(ids);
    STATUS_OK(quantize_kv_cuda({*wide_layout, narrow, wide.ptr, 0, nar.ptr, 0, scales.ptr, 0, dids.ptr, dids.ptr,
                                f.num_slots, f.num_slots, f.num_slots}, nullptr));
    auto kv_q = PagedKv::create(*nl, 0, {nar.ptr, f.num_slots, 0, scales.ptr, 0}, {table.ptr, f.max_blocks, lens.ptr, 1});
    STATUS_OK(kv_q.status());
    run(*kv_q, out_q);
    const auto got = out_q.download();
    double max_ref = 0, max_err = 0, se = 0, sr = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double r = bf16_to_float(ref[i]), g = bf16_to_float(got[i]);
      max_ref = std::max(max_ref, std::fabs(r));
      max_err = std::max(max_err, std::fabs(g - r));
      se += (g - r) * (g - r);
      sr += r * r;
    }
    g_rows.push_back({"decode error " + std::string(dtype_name(narrow)) + " K/V vs bf16 K/V, 4K tok",
                      fmt("max %.2e", max_err / max_ref), fmt("rms %.2e", std::sqrt(se / sr))});
  }
}

void run_benchmarks(bool quick) {
  Rng rng(12345);
  const double d2d = measure_d2d();
  std::ofstream tsv;
  if (!g_dump_dir.empty()) tsv.open(g_dump_dir + "/bench_decode.tsv");
  const std::vector<uint32_t> lens = quick ? std::vector<uint32_t>{32768} : std::vector<uint32_t>{32768, 65536, 131072};
  for (uint32_t len : lens) bench_decode(d2d, rng, Dtype::kBf16, 1, len, &tsv);
  bench_decode(d2d, rng, Dtype::kBf16, 8, 32768, &tsv);
  bench_decode(d2d, rng, Dtype::kInt8, 1, 32768, &tsv);
  bench_decode(d2d, rng, Dtype::kFp8E4M3, 1, 32768, &tsv);
  if (!quick) {  // the plan's split count against its neighbours, for the two bf16 32K shapes
    for (uint32_t splits : {16u, 24u, 33u, 48u, 128u}) bench_decode(d2d, rng, Dtype::kBf16, 1, 32768, nullptr, splits);
    for (uint32_t splits : {33u, 132u}) bench_decode(d2d, rng, Dtype::kBf16, 1, 131072, nullptr, splits);
    for (uint32_t splits : {4u, 16u}) bench_decode(d2d, rng, Dtype::kBf16, 8, 32768, nullptr, splits);
  }
  bench_pack(d2d, rng, EngineLayout::kVllm, "vllm");
  bench_pack(d2d, rng, EngineLayout::kFlashInferHnd, "flashinfer_hnd");
  bench_quant(d2d, rng, Dtype::kInt8);
  bench_quant(d2d, rng, Dtype::kFp8E4M3);
  bench_quant_error(rng);
}

/// Every kernel against its CPU reference, on fresh random data.
void run_checks(Rng& rng) {
  struct Kv { Dtype q, kv; };
  for (Kv dt : {Kv{Dtype::kFp16, Dtype::kFp16}, Kv{Dtype::kBf16, Dtype::kBf16}, Kv{Dtype::kBf16, Dtype::kInt8},
                Kv{Dtype::kFp16, Dtype::kInt8}, Kv{Dtype::kBf16, Dtype::kFp8E4M3}, Kv{Dtype::kFp16, Dtype::kFp8E4M3}}) {
    for (uint32_t D : {64u, 128u, 256u}) {
      check_decode(rng, dt.q, dt.kv, D, 2, 8, {1, 17, 45, 300, 32}, 1, "");
      check_decode(rng, dt.q, dt.kv, D, 1, 12, {1, 17, 45, 300, 32}, 3, "");  // MQA: two head chunks
      check_decode(rng, dt.q, dt.kv, D, 4, 4, {2000, 700}, 0, "");             // planned splits
      check_decode(rng, dt.q, dt.kv, D, 4, 8, {5, 250, 33}, 2, "");            // 2-head items
      check_decode(rng, dt.q, dt.kv, D, 2, 6, {3, 129}, 0, "");                // 3 heads in a 4-head item
      check_prefill(rng, dt.q, dt.kv, D, 2, 6, {0, 7, 32, 53}, {6, 1, 9, 17}, "");
    }
  }
  for (Dtype d : {Dtype::kFp16, Dtype::kBf16}) {
    for (uint32_t D : {64u, 128u, 256u}) {
      const std::string tag = std::string(dtype_name(d)) + "_d" + std::to_string(D);
      check_decode(rng, d, d, D, 2, 8, {777, 777}, 0, "decode_" + tag);
      check_prefill(rng, d, d, D, 2, 8, {301}, {40}, "prefill_" + tag);
    }
  }
  check_decode(rng, Dtype::kBf16, Dtype::kBf16, 128, 8, 32, {32768}, 0, "");
  check_pack(rng, EngineLayout::kVllm, "vllm");
  check_pack(rng, EngineLayout::kFlashInferNhd, "flashinfer_nhd");
  check_pack(rng, EngineLayout::kFlashInferHnd, "flashinfer_hnd");
  check_packer(rng, EngineLayout::kVllm, "vllm");
  check_packer(rng, EngineLayout::kFlashInferHnd, "flashinfer_hnd");
  for (Dtype w : {Dtype::kFp16, Dtype::kBf16})
    for (Dtype n : {Dtype::kInt8, Dtype::kFp8E4M3}) check_quant(rng, w, n);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, checks_only = false, bench_only = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--dump") == 0 && i + 1 < argc) g_dump_dir = argv[++i];
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    if (std::strcmp(argv[i], "--checks-only") == 0) checks_only = true;
    if (std::strcmp(argv[i], "--bench-only") == 0) bench_only = true;  // e.g. under ncu
  }
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("kernels_gpu_check: no CUDA device found (%s) -- skipped\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 0;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("kernels_gpu_check on %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);
  const uint64_t seed = test_seed();
  std::printf("seed %llu (KVTIER_TEST_SEED=%llu to replay)\n\ncorrectness, GPU vs CPU reference:\n",
              (unsigned long long)seed, (unsigned long long)seed);
  Rng rng(seed);
  if (!bench_only) {
    run_checks(rng);
    std::printf("\n%d check(s) failed\n", g_failures);
    if (checks_only) return g_failures == 0 ? 0 : 1;  // e.g. under compute-sanitizer
  }
  run_benchmarks(quick);
  std::printf("\nbenchmarks (%s; median of 10 samples of %d back-to-back launches; rerun: scripts/gpu_check.sh):\n",
              prop.name, kBatch);
  std::printf("  %-58s %-16s %s\n", "what", "figure", "ratio to limit");
  for (const Row& r : g_rows) std::printf("  %-58s %-16s %s\n", r.what.c_str(), r.figure.c_str(), r.ratio.c_str());
  return g_failures == 0 ? 0 : 1;
}
