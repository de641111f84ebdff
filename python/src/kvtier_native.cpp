// kvtier._native: the Python binding (nanobind) over the KvStore interface — kvtier::Client (the
// thin client, through kvtierd) and kvtier::Store (in-process) behind one bound base class, so
// Python sees the same calls as C++.
//
// Buffers are never copied here: a tensor (buffer protocol or DLPack: torch, numpy) or an object
// with __cuda_array_interface__ is checked (contiguous, size, dtype, device) and its pointer goes
// straight into a KvBuffer. The Python object is kept alive by the transfer handle until the
// transfer is final. Every call that can block releases the GIL; status errors become kvtier.Error
// subclasses (kvtier/_errors.py) carrying the code and the daemon's message.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/unique_ptr.h>
#include <spdlog/spdlog.h>
#include <xxhash.h>
#include <nanobind/stl/vector.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "api/store/doctor.h"
#include "api/store/store.h"
#include "api/vocab/byte_size.h"
#include "kvtier/client.h"
#include "kvtier/kv_store.h"
#include "tiers/block_header.h"
#include "tiers/nvme_check.h"
#include "tiers/nvme_walk.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier::python {
namespace {

// ---- errors -------------------------------------------------------------------------------------

struct StatusError {
  StatusCode code;
  std::string message;
};

[[noreturn]] void raise(const Status& s) { throw StatusError{s.code(), std::string(s.message())}; }
void check(const Status& s) {
  if (!s.is_ok()) raise(s);
}
template <typename T>
T unwrap(Result<T> r) {
  if (!r.is_ok()) raise(r.status());
  return std::move(r).value();
}
[[noreturn]] void bad(std::string message) { raise(invalid_argument(std::move(message))); }
/// `f()` run without the GIL; what it returns (a Result left for the caller to judge).
template <typename F>
auto without_gil(F&& f) {
  nb::gil_scoped_release unlocked;
  return f();
}
/// `f()` (a call returning a Result) run without the GIL, its value or its error raised.
template <typename F>
auto unwrap_without_gil(F&& f) {
  std::optional<decltype(f())> r;
  {
    nb::gil_scoped_release unlocked;
    r.emplace(f());
  }
  return unwrap(std::move(*r));
}

void translate(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const StatusError& e) {
    nb::object errors = nb::module_::import_("kvtier._errors");
    nb::object err = errors.attr("make_error")(status_code_name(e.code), e.message);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
  }
}

// ---- names --------------------------------------------------------------------------------------

Priority priority_of(std::string_view name) {
  for (int i = 0; i < kNumPriorities; ++i) {
    if (priority_name(static_cast<Priority>(i)) == name) return static_cast<Priority>(i);
  }
  bad("unknown priority '" + std::string(name) + "': low, normal, high or retained");
}

Tier tier_of(std::string_view name) {
  for (Tier t : kAllTiers) {
    if (tier_name(t) == name) return t;
  }
  bad("unknown tier '" + std::string(name) + "': hbm, host or nvme");
}

std::vector<std::string> tiers_in(uint8_t mask) {
  std::vector<std::string> out;
  for (Tier t : kAllTiers) {
    if (mask & tier_bit(t)) out.emplace_back(tier_name(t));
  }
  return out;
}

// ---- tokens -------------------------------------------------------------------------------------

// A list or tuple of ints, or a one-dimensional integer array on the CPU (torch, numpy, ...).
std::vector<TokenId> tokens_of(nb::handle obj) {
  std::vector<TokenId> out;
  auto put = [&](long long v) {
    if (v < 0 || v > 0xFFFFFFFFll) bad("token id " + std::to_string(v) + " is outside [0, 2^32)");
    out.push_back(static_cast<TokenId>(v));
  };
  nb::ndarray<nb::ro> arr;
  if (!nb::isinstance<nb::list>(obj) && !nb::isinstance<nb::tuple>(obj) && nb::try_cast(obj, arr, false)) {
    if (arr.device_type() != nb::device::cpu::value) bad("tokens must be on the CPU");
    auto dt = arr.dtype();
    if (dt.code != uint8_t(nb::dlpack::dtype_code::Int) && dt.code != uint8_t(nb::dlpack::dtype_code::UInt)) {
      bad("tokens must be integers");
    }
    if (arr.ndim() != 1) bad("tokens must be one-dimensional, got " + std::to_string(arr.ndim()) + " dimensions");
    const size_t n = arr.shape(0);
    const int64_t stride = arr.stride(0) * int64_t(arr.itemsize());
    const auto* base = static_cast<const uint8_t*>(arr.data());
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* p = base + int64_t(i) * stride;
      const bool is_signed = dt.code == uint8_t(nb::dlpack::dtype_code::Int);
      switch (dt.bits) {
        case 64: {
          int64_t v;
          std::memcpy(&v, p, 8);
          if (!is_signed && static_cast<uint64_t>(v) > 0xFFFFFFFFull) bad("token id is outside [0, 2^32)");
          put(v);
          break;
        }
        case 32: {
          if (is_signed) {
            int32_t v;
            std::memcpy(&v, p, 4);
            put(v);
          } else {
            uint32_t v;
            std::memcpy(&v, p, 4);
            put(v);
          }
          break;
        }
        case 16: {
          uint16_t v;
          std::memcpy(&v, p, 2);
          put(is_signed ? static_cast<long long>(static_cast<int16_t>(v)) : v);
          break;
        }
        case 8: put(is_signed ? static_cast<long long>(static_cast<int8_t>(*p)) : *p); break;
        default: bad("tokens must be 8-, 16-, 32- or 64-bit integers");
      }
    }
    return out;
  }
  if (!nb::isinstance<nb::sequence>(obj)) bad("tokens must be a sequence of ints or a 1-D integer tensor");
  const size_t n = nb::len(obj);
  out.reserve(n);
  for (nb::handle item : obj) {
    long long v;
    if (!nb::try_cast(item, v)) bad("tokens must be ints");
    put(v);
  }
  return out;
}

// ---- buffers ------------------------------------------------------------------------------------

// One array as kvtier sees it: where its bytes are and what they are.
struct ArrayView {
  void* data = nullptr;
  uint64_t nbytes = 0;
  std::vector<int64_t> shape;
  uint32_t itemsize = 1;
  int dtype_code = -1;  // nanobind's dtype code, -1 when unknown (CUDA array interface, 'V')
  LocationKind memory = LocationKind::kHost;
};

uint32_t element_bytes(Dtype d) { return dtype_bits(d) >= 8 ? dtype_bits(d) / 8 : 1; }

// The element type must be raw bytes (any 1-byte type) or the layout's own.
void check_dtype(const ArrayView& a, Dtype want, const char* what) {
  if (a.itemsize == 1) return;
  const uint32_t bytes = element_bytes(want);
  bool ok = a.itemsize == bytes;
  if (ok && a.dtype_code >= 0) {
    using C = nb::dlpack::dtype_code;
    switch (want) {
      case Dtype::kFp32:
      case Dtype::kFp16: ok = a.dtype_code == int(C::Float); break;
      case Dtype::kBf16: ok = a.dtype_code == int(C::Bfloat); break;
      default: ok = false;  // 8-bit and packed layouts take bytes only
    }
  }
  if (!ok) {
    bad(std::string(what) + ": element type does not match the layout's " + std::string(dtype_name(want)) +
        " (give a tensor of that dtype, or of bytes)");
  }
}

// C-contiguous: each dimension's stride (in the units stride_at counts, of which an element is
// `element`) is the product of the later dimensions; size-1 dimensions may have any stride.
template <typename StrideAt>
void check_c_contiguous(const std::vector<int64_t>& shape, StrideAt stride_at, int64_t element, const char* what) {
  int64_t expect = element;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && stride_at(i) != expect) {
      bad(std::string(what) + " is not contiguous: kvtier copies whole blocks and never gathers in Python "
          "(call .contiguous() first)");
    }
    expect *= shape[i];
  }
}

template <typename Array>
ArrayView view_of(const Array& arr, const char* what) {
  ArrayView v;
  v.data = const_cast<void*>(static_cast<const void*>(arr.data()));
  v.itemsize = static_cast<uint32_t>(arr.itemsize());
  v.dtype_code = arr.dtype().code;
  v.nbytes = arr.nbytes();
  if (arr.dtype().bits % 8 != 0 || arr.dtype().lanes != 1) {
    bad(std::string(what) + ": packed element types are not supported");
  }
  for (size_t i = 0; i < arr.ndim(); ++i) v.shape.push_back(static_cast<int64_t>(arr.shape(i)));
  check_c_contiguous(v.shape, [&](size_t i) { return arr.stride(i); }, 1, what);  // strides in elements
  switch (arr.device_type()) {
    case nb::device::cpu::value:
    case nb::device::cuda_host::value: v.memory = LocationKind::kHost; break;
    case nb::device::cuda::value: v.memory = LocationKind::kDevice; break;
    default: bad(std::string(what) + " lives on a device kvtier does not serve (CPU and CUDA only)");
  }
  return v;
}

// Buffer protocol or DLPack, never converted (a conversion would be a copy the load never reaches).
std::optional<ArrayView> from_ndarray(nb::handle obj, bool writable, const char* what) {
  nb::ndarray<> rw;
  if (nb::try_cast(obj, rw, false)) return view_of(rw, what);
  nb::ndarray<nb::ro> ro;
  if (!nb::try_cast(obj, ro, false)) return std::nullopt;
  if (writable) bad(std::string(what) + " is read-only: a load writes into it");
  return view_of(ro, what);
}

std::optional<ArrayView> from_cuda_array_interface(nb::handle obj, bool writable, const char* what) {
  if (!nb::hasattr(obj, "__cuda_array_interface__")) return std::nullopt;
  nb::dict cai = nb::cast<nb::dict>(obj.attr("__cuda_array_interface__"));
  nb::tuple data = nb::cast<nb::tuple>(cai["data"]);
  ArrayView v;
  v.data = reinterpret_cast<void*>(nb::cast<uintptr_t>(data[0]));
  if (writable && nb::cast<bool>(data[1])) bad(std::string(what) + " is read-only: a load writes into it");
  std::string typestr = nb::cast<std::string>(cai["typestr"]);
  if (typestr.size() < 3) bad(std::string(what) + ": bad __cuda_array_interface__ typestr");
  v.itemsize = static_cast<uint32_t>(std::stoul(typestr.substr(2)));
  using C = nb::dlpack::dtype_code;
  switch (typestr[1]) {
    case 'f': v.dtype_code = int(C::Float); break;
    case 'i': v.dtype_code = int(C::Int); break;
    case 'u': v.dtype_code = int(C::UInt); break;
    default: v.dtype_code = -1;
  }
  // bfloat16 has no typestr of its own: a 2-byte integer or void array stands for it.
  if (v.itemsize == 2 && typestr[1] != 'f') v.dtype_code = -1;
  uint64_t elements = 1;
  for (nb::handle d : nb::cast<nb::tuple>(cai["shape"])) {
    v.shape.push_back(nb::cast<int64_t>(d));
    elements *= static_cast<uint64_t>(v.shape.back());
  }
  if (cai.contains("strides") && !cai["strides"].is_none()) {  // in bytes; None means C-contiguous
    auto strides = nb::cast<nb::tuple>(cai["strides"]);
    check_c_contiguous(v.shape, [&](size_t i) { return nb::cast<int64_t>(strides[i]); }, v.itemsize, what);
  }
  v.nbytes = elements * v.itemsize;
  v.memory = LocationKind::kDevice;
  return v;
}

ArrayView array_of(nb::handle obj, bool writable, const char* what) {
  if (auto v = from_ndarray(obj, writable, what)) return *v;
  if (auto v = from_cuda_array_interface(obj, writable, what)) return *v;
  bad(std::string(what) + " must be a tensor: the buffer protocol, DLPack or __cuda_array_interface__ (got " +
      nb::cast<std::string>(nb::str(obj.type())) + ")");
}

// An engine's paged KV cache: one tensor per layer and the page of each block.
struct PagedKv {
  std::string engine;  // "vllm", "flashinfer_nhd", "flashinfer_hnd", "vllm_cpu"
  nb::list layers;
  std::vector<int32_t> pages;
  uint32_t page_tokens = 0;
};

EngineLayout engine_layout_of(std::string_view name) {
  if (name == "vllm") return EngineLayout::kVllm;
  if (name == "flashinfer_nhd") return EngineLayout::kFlashInferNhd;
  if (name == "flashinfer_hnd") return EngineLayout::kFlashInferHnd;
  if (name == "vllm_cpu") return EngineLayout::kVllmCpu;
  bad("unknown paged layout '" + std::string(name) + "': vllm, flashinfer_nhd, flashinfer_hnd or vllm_cpu");
}

// `obj` as a KvBuffer for `blocks` blocks (0: as many as it holds). Canonical blocks are one array
// [blocks, ...] of bytes_per_block per row, or a list of arrays of bytes_per_block each.
KvBuffer buffer_of(nb::handle obj, const KvLayout& layout, bool writable, const char* what) {
  const uint64_t bpb = layout.bytes_per_block();
  if (nb::isinstance<PagedKv>(obj)) {
    auto& paged = nb::cast<PagedKv&>(obj);
    const EngineLayout engine = engine_layout_of(paged.engine);
    if (nb::len(paged.layers) != layout.num_layers) {
      bad(std::string(what) + ": " + std::to_string(nb::len(paged.layers)) + " layer tensors for a layout of " +
          std::to_string(layout.num_layers) + " layers");
    }
    if (paged.page_tokens % layout.block_tokens != 0) {
      bad(std::string(what) + ": pages of " + std::to_string(paged.page_tokens) + " tokens are not whole blocks of " +
          std::to_string(layout.block_tokens) + " tokens");
    }
    const uint64_t pieces = paged.page_tokens ? paged.page_tokens / layout.block_tokens : 1;  // blocks per page
    const uint64_t page_bytes = layout.bytes_per_block_layer() * pieces;
    std::vector<void*> bases;
    uint64_t pages_per_layer = 0;
    std::optional<LocationKind> memory;
    for (nb::handle layer : paged.layers) {
      ArrayView a = array_of(layer, writable, what);
      check_dtype(a, layout.dtype, what);
      if (a.nbytes == 0 || a.nbytes % page_bytes != 0) {
        bad(std::string(what) + ": a layer tensor of " + std::to_string(a.nbytes) + " bytes is not whole pages of " +
            std::to_string(page_bytes));
      }
      if (memory && *memory != a.memory) bad(std::string(what) + ": layer tensors on different devices");
      memory = a.memory;
      const uint64_t n = a.nbytes / page_bytes;
      if (pages_per_layer != 0 && n != pages_per_layer) bad(std::string(what) + ": layer tensors of different sizes");
      pages_per_layer = n;
      bases.push_back(a.data);
    }
    for (int32_t p : paged.pages) {
      if (p < 0 || uint64_t(p) >= pages_per_layer * pieces) {
        bad(std::string(what) + ": " + (pieces > 1 ? "block piece " : "page ") + std::to_string(p) + " is outside the " +
            std::to_string(pages_per_layer * pieces) + (pieces > 1 ? " block pieces" : " pages") + " of each layer tensor");
      }
    }
    return KvBuffer::paged(engine, std::move(bases), static_cast<uint32_t>(pages_per_layer), paged.pages,
                           memory.value_or(LocationKind::kHost), paged.page_tokens);
  }
  if (nb::isinstance<nb::list>(obj) || nb::isinstance<nb::tuple>(obj)) {
    std::vector<std::byte*> blocks;
    std::optional<LocationKind> memory;
    for (nb::handle item : obj) {
      ArrayView a = array_of(item, writable, what);
      check_dtype(a, layout.dtype, what);
      if (a.nbytes != bpb) {
        bad(std::string(what) + ": a block of " + std::to_string(a.nbytes) + " bytes; the layout's blocks are " +
            std::to_string(bpb));
      }
      if (memory && *memory != a.memory) bad(std::string(what) + ": blocks on different devices");
      memory = a.memory;
      blocks.push_back(static_cast<std::byte*>(a.data));
    }
    return KvBuffer::canonical(blocks, memory.value_or(LocationKind::kHost));
  }
  ArrayView a = array_of(obj, writable, what);
  check_dtype(a, layout.dtype, what);
  if (a.shape.empty() || a.shape[0] == 0) bad(std::string(what) + ": needs a first dimension of blocks");
  const uint64_t blocks = static_cast<uint64_t>(a.shape[0]);
  if (a.nbytes != blocks * bpb) {
    bad(std::string(what) + ": " + std::to_string(a.nbytes / blocks) + " bytes per row; the layout's blocks are " +
        std::to_string(bpb) + " (" + layout.describe() + ")");
  }
  return KvBuffer::contiguous(static_cast<std::byte*>(a.data), blocks, bpb, a.memory);
}

// ---- the bound objects --------------------------------------------------------------------------

struct PyMatch {
  Match match;
  std::shared_ptr<KvStore> owner;  // for release(); empty once released

  /// Ends the lease (once; later calls do nothing).
  void release() {
    if (!owner) return;
    auto store = std::move(owner);
    Match m = match;
    match.lease = kNoLease;
    nb::gil_scoped_release unlocked;
    check(store->release(m));
  }
};

struct PyHandle {
  PyHandle() = default;
  PyHandle(PyHandle&&) noexcept = default;
  std::unique_ptr<TransferHandle> handle;
  std::shared_ptr<KvStore> owner;  // the store outlives every transfer it runs
  nb::object keep;                 // the destination; freed only once the transfer is final

  ~PyHandle() {
    if (!handle) return;  // moved from
    nb::gil_scoped_release unlocked;
    handle.reset();  // waits for the job (TransferHandle's lifetime rule)
    owner.reset();
  }
};

class PyStore {
 public:
  explicit PyStore(std::shared_ptr<KvStore> store) : store_(std::move(store)) {}
  virtual ~PyStore() { close(); }

  std::shared_ptr<KvStore> get() const {
    std::lock_guard lock(mu_);
    if (!store_) raise(Status(StatusCode::kUnavailable, "this store or client is closed"));
    return store_;
  }
  bool closed() const {
    std::lock_guard lock(mu_);
    return store_ == nullptr;
  }
  virtual void close() {
    std::shared_ptr<KvStore> old;
    {
      std::lock_guard lock(mu_);
      old.swap(store_);
    }
    nb::gil_scoped_release unlocked;
    old.reset();  // the last call in flight ends it otherwise
  }

  KvLayout layout() const { return get()->layout(); }

  NamespaceId open_namespace(std::string model, std::string tenant, std::string adapter, std::string revision,
                             double prefill_tokens_per_second) {
    auto s = get();
    NamespaceRequest req{.model_id = std::move(model), .tenant = std::move(tenant),
                         .adapter_id = std::move(adapter), .revision = std::move(revision),
                         .prefill_tokens_per_second = prefill_tokens_per_second};
    nb::gil_scoped_release unlocked;
    return unwrap(s->open_namespace(req));
  }

  // kvtier inspect / kvtier doctor: JSON text, from kvtierd (operators only) or the in-process Store.
  std::string inspect(uint32_t top_prefixes) {
    auto s = get();
    nb::gil_scoped_release unlocked;
    if (auto* c = dynamic_cast<Client*>(s.get())) return unwrap(c->inspect(top_prefixes));
    return inspect_json(static_cast<Store&>(*s), top_prefixes, "store", {});
  }
  std::string doctor(std::string model, std::string tenant, std::string adapter, std::string revision,
                     nb::handle tokens, uint32_t engine_block_tokens, uint64_t engine_layout_fingerprint) {
    auto s = get();
    std::vector<TokenId> t = tokens_of(tokens);
    nb::gil_scoped_release unlocked;
    if (auto* c = dynamic_cast<Client*>(s.get())) {
      NamespaceRequest req{.model_id = std::move(model), .tenant = std::move(tenant),
                           .adapter_id = std::move(adapter), .revision = std::move(revision)};
      return unwrap(c->doctor(req, t, {}, engine_block_tokens, engine_layout_fingerprint));
    }
    Store& store = static_cast<Store&>(*s);
    // In-process a tenant is its own salt (Store::open_namespace).
    DoctorRequest d{.spec = {.model_id = std::move(model), .layout = store.layout(), .tenant_salt = tenant,
                             .adapter_id = std::move(adapter), .revision = std::move(revision)},
                    .tenant = tenant,
                    .tokens = std::move(t),
                    .engine_block_tokens = engine_block_tokens,
                    .engine_layout_fingerprint = engine_layout_fingerprint};
    return unwrap(doctor_json(store, d, {}));
  }

  // kvtier export through kvtierd (python/kvtier/export.py): pages of the daemon's blocks, and
  // their verified bytes.
  Client& daemon(const char* what) {
    auto* c = dynamic_cast<Client*>(get().get());
    if (!c) throw std::invalid_argument(std::string(what) + " reads a running kvtierd: connect a kvtier.Client");
    return *c;
  }
  std::string export_list(bool restart, const std::vector<std::string>& roots, uint32_t max_blocks) {
    auto keep = get();
    Client& c = daemon("export_list");
    std::vector<BlockKey> keys;
    for (const std::string& r : roots) keys.push_back(unwrap(BlockKey::from_hex(r)));
    nb::gil_scoped_release unlocked;
    return unwrap(c.export_list(restart, keys, max_blocks));
  }
  /// Per key (hex): (None, bytes) or (the status's text, None).
  nb::list export_read(const std::vector<std::string>& hex_keys) {
    auto keep = get();
    Client& c = daemon("export_read");
    std::vector<BlockKey> keys;
    for (const std::string& k : hex_keys) keys.push_back(unwrap(BlockKey::from_hex(k)));
    const uint64_t bpb = c.layout().bytes_per_block();
    std::vector<std::byte> buf(keys.size() * bpb);
    std::vector<Status> got;
    {
      nb::gil_scoped_release unlocked;
      got = unwrap(c.export_read(keys, buf));
    }
    nb::list out;
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i].is_ok()) {
        out.append(nb::make_tuple(nb::none(), nb::bytes(reinterpret_cast<const char*>(buf.data() + i * bpb), bpb)));
      } else {
        out.append(nb::make_tuple(got[i].to_string(), nb::none()));
      }
    }
    return out;
  }

  PyMatch lookup(NamespaceId ns, nb::handle tokens) {
    auto s = get();
    std::vector<TokenId> t = tokens_of(tokens);
    PyMatch m;
    {
      nb::gil_scoped_release unlocked;
      m.match = unwrap(s->lookup(ns, t));
    }
    m.owner = std::move(s);
    return m;
  }

  PyHandle load(const PyMatch& m, nb::object dst, uint32_t layer_begin, uint32_t layer_count, uint32_t first_block) {
    auto s = get();
    if (first_block > m.match.blocks.size()) {
      bad("first_block " + std::to_string(first_block) + " is past the match's " + std::to_string(m.match.blocks.size()) +
          " blocks");
    }
    KvBuffer buf = buffer_of(dst, s->layout(), /*writable=*/true, "dst");  // its block count: check_load's
    if (m.match.lease == kNoLease && !m.match.blocks.empty()) bad("the match was released: look it up again");
    if (m.owner && m.owner != s) bad("the match belongs to another store or client");
    PyHandle h;
    {
      nb::gil_scoped_release unlocked;
      const Match part = first_block == 0 ? Match{} : m.match.tail(first_block);
      const Match& from = first_block == 0 ? m.match : part;
      h.handle = std::make_unique<TransferHandle>(
          unwrap(layer_begin == 0 && layer_count == 0 ? s->load(from, buf)
                                                      : s->load_layers(from, buf, {layer_begin, layer_count})));
    }
    h.owner = std::move(s);
    h.keep = std::move(dst);
    return h;
  }

  void release(PyMatch& m) {
    if (m.owner && m.owner != get()) bad("the match belongs to another store or client");
    m.release();
  }

  size_t save(NamespaceId ns, nb::handle tokens, nb::handle src, size_t first_block, std::string_view priority) {
    auto s = get();
    std::vector<TokenId> t = tokens_of(tokens);
    const Priority p = priority_of(priority);
    KvBuffer buf = buffer_of(src, s->layout(), /*writable=*/false, "src");
    nb::gil_scoped_release unlocked;
    return unwrap(s->save(ns, t, buf, p, {}, first_block));
  }

  size_t prefetch(NamespaceId ns, nb::handle tokens, std::string_view to) {
    auto s = get();
    std::vector<TokenId> t = tokens_of(tokens);
    const Tier tier = tier_of(to);
    nb::gil_scoped_release unlocked;
    return unwrap(s->prefetch(ns, t, tier));
  }

  size_t pin(NamespaceId ns, nb::handle tokens, std::string_view priority) {
    auto s = get();
    std::vector<TokenId> t = tokens_of(tokens);
    const Priority p = priority_of(priority);
    nb::gil_scoped_release unlocked;
    return unwrap(s->pin(ns, t, p));
  }

  size_t unpin(NamespaceId ns, nb::handle tokens) {
    auto s = get();
    std::vector<TokenId> t = tokens_of(tokens);
    nb::gil_scoped_release unlocked;
    return unwrap(s->unpin(ns, t));
  }

  // Key-addressed objects (KvStore::object_put and friends); keys are bytes.
  static std::span<const std::byte> host_bytes(const ArrayView& a, const char* what) {
    if (a.memory != LocationKind::kHost) bad(std::string(what) + " must be in host memory");
    return {static_cast<const std::byte*>(a.data), a.nbytes};
  }
  bool object_put(NamespaceId ns, nb::bytes key, nb::handle data, std::string_view priority) {
    auto s = get();
    const Priority p = priority_of(priority);
    const ArrayView a = array_of(data, /*writable=*/false, "data");
    const std::span<const std::byte> bytes = host_bytes(a, "data");
    const std::string k(key.c_str(), key.size());
    nb::gil_scoped_release unlocked;
    return unwrap(s->object_put(ns, k, bytes, p));
  }
  /// The object's bytes (a new bytes object when `out` is None, else its length in `out`), or
  /// None when it is not stored.
  nb::object object_get(NamespaceId ns, nb::bytes key, nb::handle out) {
    auto s = get();
    const std::string k(key.c_str(), key.size());
    auto length_or_none = [](Result<uint64_t> got) -> std::optional<uint64_t> {
      if (!got && got.status().code() == StatusCode::kNotFound) return std::nullopt;
      return unwrap(std::move(got));
    };
    if (!out.is_none()) {
      const ArrayView a = array_of(out, /*writable=*/true, "out");
      if (a.memory != LocationKind::kHost) bad("out must be in host memory");
      auto got = without_gil([&] { return s->object_get(ns, k, {static_cast<std::byte*>(a.data), a.nbytes}); });
      auto n = length_or_none(std::move(got));
      return n ? nb::object(nb::int_(*n)) : nb::none();
    }
    // Room for the largest object it can be: a client's window (left unwritten, so only the
    // pages the object fills are touched), or the stored chain in-process.
    std::unique_ptr<std::byte[]> buf;
    uint64_t room = 0;
    auto got = without_gil([&] {
      if (auto* c = dynamic_cast<Client*>(s.get())) {
        room = c->window_bytes();
      } else if (auto n = static_cast<Store&>(*s).namespace_of(ns); n) {
        if (auto chain = static_cast<Store&>(*s).objects().chain(*n, k); chain) {
          room = chain->keys.size() * s->layout().bytes_per_block();
        }
      }
      buf = std::make_unique_for_overwrite<std::byte[]>(room);
      return s->object_get(ns, k, {buf.get(), room});
    });
    auto n = length_or_none(std::move(got));
    if (!n) return nb::none();
    return nb::bytes(reinterpret_cast<const char*>(buf.get()), *n);
  }
  static std::vector<std::string> keys_of(const std::vector<nb::bytes>& keys) {
    std::vector<std::string> out;
    out.reserve(keys.size());
    for (const nb::bytes& k : keys) out.emplace_back(k.c_str(), k.size());
    return out;
  }
  size_t object_exists(NamespaceId ns, const std::vector<nb::bytes>& keys) {
    auto s = get();
    const std::vector<std::string> k = keys_of(keys);
    nb::gil_scoped_release unlocked;
    return unwrap(s->object_exists(ns, k));
  }
  size_t object_remove(NamespaceId ns, const std::vector<nb::bytes>& keys) {
    auto s = get();
    const std::vector<std::string> k = keys_of(keys);
    nb::gil_scoped_release unlocked;
    return unwrap(s->object_remove(ns, k));
  }

  std::string metrics_text() {
    auto s = get();
    nb::gil_scoped_release unlocked;
    return unwrap(s->metrics_text());
  }

 protected:
  mutable std::mutex mu_;
  std::shared_ptr<KvStore> store_;
};

class PyClient : public PyStore {
 public:
  explicit PyClient(std::shared_ptr<Client> c) : PyStore(c), client_id_(c->client_id()), tenants_(c->tenants()),
                                                 window_bytes_(c->window_bytes()) {}

  uint64_t client_id() const { return client_id_; }
  const std::vector<std::string>& tenants() const { return tenants_; }
  uint64_t window_bytes() const { return window_bytes_; }

  void register_memory(nb::handle tensor) {
    auto s = get();
    ArrayView a = array_of(tensor, /*writable=*/true, "tensor");
    nb::gil_scoped_release unlocked;
    check(static_cast<Client&>(*s).register_memory(a.data, a.nbytes));
  }
  // Host memory shared with the daemon, as a 1-D numpy uint8 array (buffer protocol and DLPack) that owns
  // it; the client stays alive while the array does.
  nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>> allocate_shared_host(uint64_t bytes) {
    auto s = get();
    std::unique_ptr<SharedHostMemory> mem;
    {
      nb::gil_scoped_release unlocked;
      mem = unwrap(static_cast<Client&>(*s).allocate_shared_host(bytes));
    }
    struct Owner {
      std::shared_ptr<KvStore> client;  // destroyed after the memory (members in reverse order)
      std::unique_ptr<SharedHostMemory> mem;
    };
    auto* owner = new Owner{std::move(s), std::move(mem)};
    std::byte* data = owner->mem->data();
    const size_t shape[1] = {static_cast<size_t>(owner->mem->size())};
    nb::capsule keep(owner, [](void* p) noexcept {
      nb::gil_scoped_release unlocked;  // unregistering is a round trip to the daemon
      delete static_cast<Owner*>(p);
    });
    return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(data, 1, shape, keep);
  }

  void unregister_memory(nb::handle tensor) {
    auto s = get();
    ArrayView a = array_of(tensor, /*writable=*/true, "tensor");
    nb::gil_scoped_release unlocked;
    check(static_cast<Client&>(*s).unregister_memory(a.data));
  }

 private:
  uint64_t client_id_;
  std::vector<std::string> tenants_;
  uint64_t window_bytes_;
};

std::unique_ptr<PyClient> connect(std::optional<std::string> socket_path, std::optional<uint64_t> window_bytes,
                                  std::optional<std::string> name) {
  ClientOptions o;
  if (socket_path) o.socket_path = *socket_path;
  if (window_bytes) o.window_bytes = *window_bytes;
  o.name = name.value_or("kvtier-python");
  std::unique_ptr<Client> c;
  {
    nb::gil_scoped_release unlocked;
    c = unwrap(Client::connect(std::move(o)));
  }
  return std::make_unique<PyClient>(std::shared_ptr<Client>(std::move(c)));
}

uint64_t bytes_of(nb::handle v, const char* what) {
  if (nb::isinstance<nb::str>(v)) {
    auto r = parse_bytes(nb::cast<std::string>(v));
    if (!r) bad(std::string(what) + ": " + std::string(r.status().message()));
    return *r;
  }
  long long n;
  if (!nb::try_cast(v, n) || n < 0) bad(std::string(what) + " must be a byte count or a size like \"64MiB\"");
  return static_cast<uint64_t>(n);
}

std::unique_ptr<PyStore> open_store(const KvLayout& layout, nb::handle host_bytes, std::optional<std::string> nvme_dir,
                                    nb::handle nvme_bytes, std::string secret, bool write_through) {
  TierManagerOptions t;
  t.layout = layout;
  t.host.capacity_bytes = bytes_of(host_bytes, "host_bytes");
  if (nvme_dir) {
    t.nvme.dir = *nvme_dir;
    t.nvme_limits.capacity_bytes = bytes_of(nvme_bytes, "nvme_bytes");
    if (t.nvme_limits.capacity_bytes == 0) bad("nvme_bytes must be given with nvme_dir");
  }
  t.write_policy = write_through ? WritePolicy::kWriteThrough : WritePolicy::kWriteBack;
  StoreOptions o{.tiers = std::move(t), .secret = std::move(secret)};
  std::unique_ptr<Store> s;
  {
    nb::gil_scoped_release unlocked;
    s = unwrap(Store::open(std::move(o)));
  }
  return std::make_unique<PyStore>(std::shared_ptr<KvStore>(std::move(s)));
}

KvLayout layout_standard(uint32_t layers, uint32_t kv_heads, uint32_t head_dim, std::string_view dtype,
                         uint32_t block_tokens) {
  return unwrap(KvLayout::standard(layers, kv_heads, head_dim, unwrap(parse_dtype(dtype)), block_tokens));
}

KvLayout layout_from_hf(std::string_view json, uint32_t block_tokens, std::optional<std::string> dtype) {
  std::optional<Dtype> d;
  if (dtype) d = unwrap(parse_dtype(*dtype));
  return unwrap(KvLayout::from_hf_config(json, block_tokens, d ? &*d : nullptr));
}

// kvtier fsck (python/kvtier/fsck.py): the check runs without the GIL; `progress(done, total)`
// takes it for each call.
nb::dict check_nvme_tier_py(const std::string& dir, bool repair, nb::object progress, size_t max_listed) {
  NvmeCheckOptions o;
  o.repair = repair;
  o.max_listed = max_listed;
  if (!progress.is_none()) {
    o.progress = [&progress](uint64_t done, uint64_t total) {
      nb::gil_scoped_acquire locked;
      progress(done, total);
    };
  }
  const NvmeCheckReport rep = unwrap_without_gil([&] { return check_nvme_tier(dir, o); });
  nb::dict d;
  d["dir"] = rep.dir;
  d["layout"] = rep.layout;
  d["slot_bytes"] = rep.slot_bytes;
  d["files"] = rep.files;
  d["slots"] = rep.slots;
  d["namespaces"] = rep.namespaces;
  d["entries"] = rep.entries;
  d["good_blocks"] = rep.good_blocks;
  d["good_bytes"] = rep.good_bytes;
  d["bytes_read"] = rep.bytes_read;
  d["undecodable_entries"] = rep.undecodable_entries;
  d["bad_slots"] = rep.bad_slots;
  d["broken_chains"] = rep.broken_chains;
  d["no_namespace"] = rep.no_namespace;
  d["slots_without_entry"] = rep.slots_without_entry;
  d["errors"] = rep.errors();
  d["repaired"] = rep.repaired;
  nb::list problems;
  for (const NvmeCheckProblem& p : rep.problems) {
    nb::dict e;
    e["kind"] = p.kind;
    e["key"] = p.key.to_hex();
    e["slot"] = p.slot == kNoSlot ? nb::object(nb::none()) : nb::cast(p.slot);
    e["detail"] = p.detail;
    e["repaired"] = p.repaired;
    problems.append(e);
  }
  d["problems"] = problems;
  return d;
}

nb::dict namespace_dict(const NamespaceRecord& r) {
  nb::dict d;
  d["root"] = r.root.to_hex();
  d["model"] = r.model_id;
  d["tenant"] = r.tenant;
  d["adapter"] = r.adapter_id;
  d["revision"] = r.revision;
  d["layout"] = r.layout;
  return d;
}

nb::dict block_dict(const CatalogEntry& e) {
  nb::dict d;
  d["key"] = e.key.to_hex();
  d["parent"] = e.parent.to_hex();
  d["block_index"] = e.block_index;
  d["tokens"] = e.tokens;
  nb::list extras;
  for (const BlockKey& x : e.extras) extras.append(nb::bytes(reinterpret_cast<const char*>(&x), sizeof x));
  d["extras"] = extras;
  d["priority"] = std::string(priority_name(e.priority));
  d["created_ns"] = e.created_ns;
  return d;
}

// kvtier export (python/kvtier/export.py): a data dir's blocks, depth first, each payload verified.
// The walk runs without the GIL; each callback takes it.
nb::dict walk_data_dir(const std::string& dir, nb::object want_namespace, nb::object want_block, nb::object emit) {
  NvmeWalkOptions o;
  if (!want_namespace.is_none()) {
    o.want_namespace = [&](const NamespaceRecord& r) {
      nb::gil_scoped_acquire locked;
      return nb::cast<bool>(want_namespace(namespace_dict(r)));
    };
  }
  if (!want_block.is_none()) {
    o.want_block = [&](const NamespaceRecord& r, const CatalogEntry& e) {
      nb::gil_scoped_acquire locked;
      return nb::cast<bool>(want_block(namespace_dict(r), block_dict(e)));
    };
  }
  o.emit = [&](const NamespaceRecord& r, const CatalogEntry& e, std::span<const std::byte> payload) {
    nb::gil_scoped_acquire locked;
    emit(namespace_dict(r), block_dict(e), nb::bytes(reinterpret_cast<const char*>(payload.data()), payload.size()));
    return Status::ok();
  };
  const NvmeWalkReport rep = unwrap_without_gil([&] { return walk_nvme_tier(dir, o); });
  nb::dict d;
  d["namespaces"] = rep.namespaces;
  d["blocks"] = rep.blocks;
  d["bytes"] = rep.bytes;
  d["corrupt"] = rep.corrupt;
  d["unreachable"] = rep.unreachable;
  return d;
}

}  // namespace
}  // namespace kvtier::python

NB_MODULE(_native, m) {
  using namespace kvtier;
  using namespace kvtier::python;
  m.doc() = "kvtier's compiled core: the KvStore interface over kvtierd (Client) or in-process (Store)";
  m.attr("__version__") = KVTIER_VERSION;
  nb::register_exception_translator(&translate);
  // In-process stores log through spdlog: warnings and errors only, unless KVTIER_LOG_LEVEL says
  // otherwise (trace, debug, info, warn, error, off).
  const char* level = std::getenv("KVTIER_LOG_LEVEL");
  spdlog::set_level(level ? spdlog::level::from_str(level) : spdlog::level::warn);

  nb::class_<KvLayout>(m, "KvLayout", "The shape and element type of a model's KV cache.")
      .def_static("standard", &layout_standard, "layers"_a, "kv_heads"_a, "head_dim"_a, "dtype"_a = "bf16",
                  "block_tokens"_a = 16, "A standard-attention layout (MHA, GQA, MQA).")
      .def_static("from_hf_config", &layout_from_hf, "config_json"_a, "block_tokens"_a = 16, "dtype"_a = nb::none(),
                  "The layout a Hugging Face config.json (its text) describes; dtype overrides the config's.")
      .def_prop_ro("num_layers", [](const KvLayout& l) { return l.num_layers; })
      .def_prop_ro("num_kv_heads", [](const KvLayout& l) { return l.num_kv_heads; })
      .def_prop_ro("head_dim", [](const KvLayout& l) { return l.head_dim; })
      .def_prop_ro("dtype", [](const KvLayout& l) { return std::string(dtype_name(l.dtype)); })
      .def_prop_ro("block_tokens", [](const KvLayout& l) { return l.block_tokens; })
      .def_prop_ro("latent", [](const KvLayout& l) { return l.kind == AttentionKind::kLatent; })
      .def_prop_ro("bytes_per_block", &KvLayout::bytes_per_block)
      .def_prop_ro("bytes_per_block_layer", &KvLayout::bytes_per_block_layer)
      .def_prop_ro("bytes_per_token", &KvLayout::bytes_per_token)
      .def_prop_ro("fingerprint", &KvLayout::fingerprint)
      .def("__eq__", [](const KvLayout& a, const KvLayout& b) { return a == b; })
      .def("__repr__", [](const KvLayout& l) { return "KvLayout(" + l.describe() + ")"; });

  nb::class_<PagedKv>(m, "PagedKv",
                      "An engine's paged KV cache: one tensor per layer (vllm: [2][pages][tokens][heads][dim], "
                      "flashinfer_nhd: [pages][2][tokens][heads][dim], flashinfer_hnd: [pages][2][heads][tokens][dim], "
                      "vllm_cpu: [pages][heads][tokens * 2 * dim] with K transposed inside each (page, head), host "
                      "memory only) and where each block is. page_tokens: tokens per page, a multiple of the layout's "
                      "block_tokens (0: equal); pages then count block-sized pieces: piece p is tokens "
                      "[(p % r) * block_tokens, +block_tokens) of page p // r, r = page_tokens // block_tokens.")
      .def(
          "__init__",
          [](PagedKv* self, std::string layout, nb::list layers, std::vector<int32_t> pages, uint32_t page_tokens) {
            engine_layout_of(layout);
            new (self) PagedKv{std::move(layout), std::move(layers), std::move(pages), page_tokens};
          },
          "layout"_a, "layers"_a, "pages"_a, "page_tokens"_a = 0)
      .def_ro("layout", &PagedKv::engine)
      .def_ro("layers", &PagedKv::layers)
      .def_ro("pages", &PagedKv::pages)
      .def_ro("page_tokens", &PagedKv::page_tokens);

  nb::class_<PyMatch>(m, "Match", "The longest cached prefix of a prompt, under a lease until released.")
      .def_prop_ro("tokens", [](const PyMatch& m) { return m.match.tokens; }, "Matched tokens (whole blocks).")
      .def_prop_ro("block_count", [](const PyMatch& m) { return m.match.blocks.size(); })
      .def("__len__", [](const PyMatch& m) { return m.match.blocks.size(); })
      .def_prop_ro("lease", [](const PyMatch& m) { return m.match.lease; })
      .def_prop_ro("held_back_blocks", [](const PyMatch& m) { return m.match.held_back_blocks; },
                   "Cached blocks after the match not offered: slower to restore than to recompute at the "
                   "namespace's declared prefill speed (0 when it declares none).")
      .def_prop_ro("seconds_saved", [](const PyMatch& m) { return m.match.seconds_saved; },
                   "Estimated recompute minus restore time of the matched blocks (0 without a declared speed).")
      .def_prop_ro("released", [](const PyMatch& m) { return !m.owner; })
      .def_prop_ro(
          "tiers",
          [](const PyMatch& m) {
            std::vector<std::string> out;
            for (const auto& b : m.match.blocks) {
              auto t = tiers_in(b.tier_mask);
              out.push_back(t.empty() ? std::string("none") : t.front());
            }
            return out;
          },
          "The fastest tier of each matched block: 'hbm', 'host' or 'nvme'.")
      .def("residency", [](const PyMatch& m, size_t i) {
            if (i >= m.match.blocks.size()) throw nb::index_error("block index out of range");
            return tiers_in(m.match.blocks[i].tier_mask);
          }, "block"_a, "Every tier block `block` is resident in.")
      .def("release", &PyMatch::release, "Ends the lease (once; later calls do nothing).")
      .def("__enter__", [](nb::handle self) { return nb::borrow(self); })
      .def("__exit__",
           [](PyMatch& m, nb::handle, nb::handle, nb::handle) {
             try {
               m.release();
             } catch (const StatusError& e) {
               // The connection is gone, and the daemon ended the lease with it: nothing is held.
               if (e.code != StatusCode::kUnavailable) throw;
             }
           },
           "exc_type"_a = nb::none(), "exc"_a = nb::none(), "tb"_a = nb::none(),
           "Releases the lease; a client whose daemon went away has none left, and that is not an error.")
      .def("__repr__", [](const PyMatch& m) {
        return "Match(tokens=" + std::to_string(m.match.tokens) + ", blocks=" + std::to_string(m.match.blocks.size()) +
               (m.match.held_back_blocks ? ", held_back=" + std::to_string(m.match.held_back_blocks) : std::string()) +
               (m.owner ? ")" : ", released)");
      });

  nb::class_<PyHandle>(m, "TransferHandle", "One load in flight; per-layer completion.")
      .def("wait", [](PyHandle& h) {
            Status s;
            {
              nb::gil_scoped_release unlocked;
              s = h.handle->wait();
            }
            check(s);
          }, "Blocks until every layer is in place; raises the load's error.")
      .def("wait_layer", [](PyHandle& h, uint32_t layer) {
            Status s;
            {
              nb::gil_scoped_release unlocked;
              s = h.handle->wait_layer(layer);
            }
            check(s);
          }, "layer"_a, "Blocks until layer `layer` of every block is in place.")
      .def("done", [](const PyHandle& h) { return h.handle->poll(); }, "True once the load is final.")
      .def("cancel", [](PyHandle& h) { h.handle->cancel(); }, "Stops after the slice in flight.")
      .def_prop_ro("state", [](const PyHandle& h) { return std::string(transfer_state_name(h.handle->state())); })
      .def_prop_ro("layers_done", [](const PyHandle& h) { return h.handle->layers_done(); })
      .def_prop_ro("bytes_done", [](const PyHandle& h) { return h.handle->bytes_done(); });

  nb::class_<PyStore>(m, "KvStore", "The calls every kvtier store answers (Client through kvtierd, Store in-process).")
      .def_prop_ro("layout", &PyStore::layout)
      .def_prop_ro("closed", &PyStore::closed)
      .def("close", &PyStore::close)
      .def("open_namespace", &PyStore::open_namespace, "model"_a, "tenant"_a = "", "adapter"_a = "", "revision"_a = "",
           "prefill_tokens_per_second"_a = 0.0)
      .def("lookup", &PyStore::lookup, "ns"_a, "tokens"_a)
      .def("inspect", &PyStore::inspect, "top_prefixes"_a = 10)
      .def("export_list", &PyStore::export_list, "restart"_a, "roots"_a, "max_blocks"_a = 256)
      .def("export_read", &PyStore::export_read, "keys"_a)
      .def("doctor", &PyStore::doctor, "model"_a, "tenant"_a, "adapter"_a, "revision"_a, "tokens"_a,
           "engine_block_tokens"_a = 0, "engine_layout_fingerprint"_a = 0)
      .def("load", &PyStore::load, "match"_a, "dst"_a, "layer_begin"_a = 0, "layer_count"_a = 0, "first_block"_a = 0)
      .def("release", &PyStore::release, "match"_a)
      .def("save", &PyStore::save, "ns"_a, "tokens"_a, "src"_a, "first_block"_a = 0, "priority"_a = "normal")
      .def("prefetch", &PyStore::prefetch, "ns"_a, "tokens"_a, "to"_a = "host")
      .def("pin", &PyStore::pin, "ns"_a, "tokens"_a, "priority"_a = "retained")
      .def("unpin", &PyStore::unpin, "ns"_a, "tokens"_a)
      .def("object_put", &PyStore::object_put, "ns"_a, "key"_a, "data"_a, "priority"_a = "normal")
      .def("object_get", &PyStore::object_get, "ns"_a, "key"_a, "out"_a = nb::none())
      .def("object_exists", &PyStore::object_exists, "ns"_a, "keys"_a)
      .def("object_remove", &PyStore::object_remove, "ns"_a, "keys"_a)
      .def("metrics_text", &PyStore::metrics_text);

  nb::class_<PyClient, PyStore>(m, "NativeClient")
      .def_prop_ro("client_id", &PyClient::client_id)
      .def_prop_ro("tenants", &PyClient::tenants)
      .def_prop_ro("window_bytes", &PyClient::window_bytes)
      .def("register_memory", &PyClient::register_memory, "tensor"_a)
      .def("allocate_shared_host", &PyClient::allocate_shared_host, "bytes"_a)
      .def("unregister_memory", &PyClient::unregister_memory, "tensor"_a);

  m.def("connect", &connect, "socket_path"_a = nb::none(), "window_bytes"_a = nb::none(), "name"_a = nb::none());
  m.def("open_store", &open_store, "layout"_a, "host_bytes"_a, "nvme_dir"_a = nb::none(), "nvme_bytes"_a = 0,
        "secret"_a = "", "write_through"_a = false);
  m.def("inspect_data_dir", [](const std::string& dir) {
    return unwrap_without_gil([&] { return inspect_data_dir_json(dir); });
  }, "dir"_a, "kvtier inspect of a data dir no kvtierd holds: JSON text.");
  m.def("walk_data_dir", &walk_data_dir, "dir"_a, "want_namespace"_a.none(), "want_block"_a.none(), "emit"_a,
        "kvtier export: every namespace's blocks of a data dir no kvtierd holds, depth first, payloads verified.");
  m.def("checksum", [](nb::args parts) {
    // One XXH3-64 over the parts back to back, as over their concatenation, without making it.
    XXH3_state_t* st = XXH3_createState();
    XXH3_64bits_reset(st);
    for (nb::handle h : parts) {
      const nb::bytes b = nb::cast<nb::bytes>(h);
      XXH3_64bits_update(st, b.c_str(), b.size());
    }
    const uint64_t sum = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return sum;
  }, "XXH3-64 of the bytes objects back to back, as kvtier's slot and archive checksums.");
  m.def("check_nvme_tier", &check_nvme_tier_py, "dir"_a, "repair"_a = false, "progress"_a = nb::none(),
        "max_listed"_a = 1000,
        "kvtier fsck: checks an NVMe tier (or a kvtierd data dir) no kvtierd holds; a dict of findings.");
  m.def("status_codes", []() {
    std::vector<std::string> out;
    for (int c = 0; c <= static_cast<int>(StatusCode::kInternal); ++c) {
      out.emplace_back(status_code_name(static_cast<StatusCode>(c)));
    }
    return out;
  });
}
