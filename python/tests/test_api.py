"""The Python API over the in-process Store and a real kvtierd: the same calls, zero-copy tensors,
errors as exceptions, bad tensors refused before anything is sent, several threads on one client."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import kvtier

LAYOUT = kvtier.KvLayout.standard(2, 2, 8, "bf16", 4)  # 512 bytes per block
BPB = LAYOUT.bytes_per_block
ELEMS = BPB // 2


def kv_blocks(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ELEMS, generator=g).to(torch.bfloat16)


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


@pytest.fixture
def store(tmp_path):
    with kvtier.Store(LAYOUT, "256KiB", nvme_dir=tmp_path / "nvme", nvme_bytes="4MiB") as s:
        yield s


@pytest.fixture
def client(daemon_factory):
    d = daemon_factory(layout={"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4},
                       host_bytes="1MiB", nvme_bytes="8MiB")  # 256 slots: the tests' blocks stay in DRAM
    with kvtier.Client(d.socket) as c:
        yield c


@pytest.fixture(params=["store", "client"])
def kv(request):
    return request.getfixturevalue(request.param)


def test_version_matches_the_cpp_project():
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    cmake = (root / "CMakeLists.txt").read_text()
    assert f"project(kvtier VERSION {kvtier.__version__} " in cmake


def test_layout_describes_the_blocks():
    assert (LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_dim, LAYOUT.dtype, LAYOUT.block_tokens) == \
        (2, 2, 8, "bf16", 4)
    assert LAYOUT.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 2
    assert LAYOUT == kvtier.KvLayout.standard(2, 2, 8, "bfloat16", 4)
    assert LAYOUT.fingerprint != kvtier.KvLayout.standard(2, 2, 8, "fp16", 4).fingerprint
    with pytest.raises(kvtier.InvalidArgument):
        kvtier.KvLayout.standard(0, 2, 8)
    with pytest.raises(kvtier.InvalidArgument, match="dtype"):
        kvtier.KvLayout.standard(2, 2, 8, "float7")


def test_save_lookup_load_round_trip_without_a_copy(kv):
    ns = kv.open_namespace("m")
    src = kv_blocks(4)
    assert kv.save(ns, tokens(18), src) == 4  # the partial tail is never saved
    assert kv.save(ns, tokens(18), src) == 0  # already cached
    with kv.lookup(ns, tokens(18)) as match:
        assert (match.tokens, match.block_count, len(match)) == (16, 4, 4)
        assert match.tiers == ["host"] * 4
        assert match.lease != 0
        dst = torch.zeros_like(src)
        ptr = dst.data_ptr()
        handle = kv.load(match, dst)
        handle.wait()
        for layer in range(LAYOUT.num_layers):
            handle.wait_layer(layer)
        assert handle.done() and handle.state == "done"
        assert dst.data_ptr() == ptr  # loaded in place: the tensor itself, not a converted copy
        assert torch.equal(dst, src)
    assert match.released
    with pytest.raises(kvtier.InvalidArgument, match="released"):
        kv.load(match, dst)


def test_any_buffer_kind_numpy_bytearray_and_lists(kv):
    ns = kv.open_namespace("m")
    raw = kv_blocks(3).view(torch.uint8).numpy().copy()  # [3, 512] bytes
    assert kv.save(ns, np.arange(12, dtype=np.int64), raw) == 3  # numpy tokens, numpy bytes
    with kv.lookup(ns, torch.arange(12)) as m:  # a torch tensor of tokens
        back = bytearray(3 * BPB)
        kv.load(m, np.frombuffer(back, dtype=np.uint8).reshape(3, BPB)).wait()
        assert bytes(back) == raw.tobytes()
        parts = [torch.zeros(ELEMS, dtype=torch.bfloat16) for _ in range(2)]  # a list, first 2 only
        kv.load(m, parts).wait()
        assert torch.equal(torch.stack(parts).view(torch.uint8), torch.from_numpy(raw[:2]))


def test_a_paged_engine_cache_saves_and_loads(kv):
    ns = kv.open_namespace("paged")
    pages, bt, heads, dim = 6, 4, 2, 8
    # vLLM layout per layer: [2][pages][page_tokens][kv_heads][head_dim]
    layers = [torch.randn(2, pages, bt, heads, dim).to(torch.bfloat16) for _ in range(2)]
    block_pages = [5, 1, 3]
    assert kv.save(ns, tokens(12), kvtier.PagedKv("vllm", layers, block_pages)) == 3
    canonical = torch.zeros(3, 2, 2, bt, heads, dim, dtype=torch.bfloat16)
    with kv.lookup(ns, tokens(12)) as m:
        kv.load(m, canonical.view(3, -1)).wait()
        for b, page in enumerate(block_pages):
            for layer in range(2):
                assert torch.equal(canonical[b, layer, 0], layers[layer][0, page])
                assert torch.equal(canonical[b, layer, 1], layers[layer][1, page])
        other = [torch.zeros_like(t) for t in layers]
        kv.load(m, kvtier.PagedKv("vllm", other, [0, 2, 4])).wait()
        for layer in range(2):
            assert torch.equal(other[layer][:, [0, 2, 4]], layers[layer][:, block_pages])
    with pytest.raises(kvtier.InvalidArgument, match="page 9"):
        kv.save(ns, tokens(12), kvtier.PagedKv("vllm", layers, [0, 1, 9]))
    with pytest.raises(kvtier.InvalidArgument, match="layer tensors for a layout of 2"):
        kv.save(ns, tokens(12), kvtier.PagedKv("vllm", layers[:1], [0, 1, 2]))
    with pytest.raises(kvtier.InvalidArgument, match="unknown paged layout"):
        kvtier.PagedKv("sglang", layers, [0])


def test_bad_tensors_are_refused_before_anything_is_sent(kv):
    ns = kv.open_namespace("m")
    src = kv_blocks(2)
    cases = [
        (torch.zeros(2, ELEMS + 1, dtype=torch.bfloat16), "bytes per row"),  # wrong size
        (torch.zeros(2, ELEMS // 2, dtype=torch.float32), "element type"),  # right bytes, wrong dtype
        (torch.zeros(ELEMS, 2, dtype=torch.bfloat16).t(), "not contiguous"),
        ("not a tensor", "must be a tensor"),
        ([src[0], torch.zeros(3, dtype=torch.bfloat16)], "a block of 6 bytes"),
    ]
    for bad, message in cases:
        with pytest.raises(kvtier.InvalidArgument, match=message):
            kv.save(ns, tokens(8), bad)
    assert kv.lookup(ns, tokens(8)).block_count == 0  # nothing was stored
    kv.save(ns, tokens(8), src)
    with kv.lookup(ns, tokens(8)) as m:
        with pytest.raises(kvtier.InvalidArgument, match="read-only"):
            kv.load(m, bytes(2 * BPB))
        with pytest.raises(kvtier.InvalidArgument, match="the buffer has 3 blocks; the match has 2"):
            kv.load(m, torch.zeros(3, ELEMS, dtype=torch.bfloat16))
    for bad_tokens, message in [([1, -2, 3], "outside"), ([1.5], "ints"), (torch.zeros(2, 2, dtype=torch.int64), "one-dimensional"),
                                (torch.zeros(4), "integers"), (12, "sequence")]:
        with pytest.raises(kvtier.InvalidArgument, match=message):
            kv.lookup(ns, bad_tokens)
    with pytest.raises(kvtier.InvalidArgument, match="priority"):
        kv.save(ns, tokens(8), src, priority="urgent")
    with pytest.raises(kvtier.InvalidArgument, match="tier"):
        kv.prefetch(ns, tokens(8), to="tape")
    with pytest.raises(kvtier.NotFound):
        kv.lookup(12345, tokens(8))


def test_namespaces_separate_model_adapter_and_revision(kv):
    a = kv.open_namespace("m", revision="aaa")
    assert kv.open_namespace("m", revision="aaa") == a
    kv.save(a, tokens(8), kv_blocks(2))
    for other in (kv.open_namespace("m", revision="bbb"), kv.open_namespace("m"),
                  kv.open_namespace("m", adapter="lora", revision="aaa"), kv.open_namespace("m2", revision="aaa")):
        assert other != a
        assert kv.lookup(other, tokens(8)).block_count == 0
    assert kv.lookup(a, tokens(8)).block_count == 2


def test_pin_unpin_prefetch_and_metrics(kv):
    ns = kv.open_namespace("m")
    kv.save(ns, tokens(8), kv_blocks(2), priority="high")
    assert kv.pin(ns, tokens(8)) == 2
    assert kv.unpin(ns, tokens(8)) == 2
    assert kv.prefetch(ns, tokens(8), to="host") == 0  # already there
    m = kv.metrics()
    assert m['kvtier_tier_capacity_bytes{tier="host"}'] > 0
    assert "kvtier_tier_capacity_bytes" in kv.metrics_text()


def test_store_keeps_blocks_on_nvme_across_a_reopen(tmp_path):
    src = kv_blocks(3, seed=5)
    with kvtier.Store(LAYOUT, "256KiB", nvme_dir=tmp_path, nvme_bytes="4MiB", secret="s") as s:
        s.save(s.open_namespace("m"), tokens(12), src)
    with kvtier.Store(LAYOUT, "256KiB", nvme_dir=tmp_path, nvme_bytes="4MiB", secret="s") as s:
        with s.lookup(s.open_namespace("m"), tokens(12)) as m:
            assert m.tiers == ["nvme"] * 3
            dst = torch.empty_like(src)
            s.load(m, dst).wait()
            assert torch.equal(dst, src)
    with kvtier.Store(LAYOUT, "256KiB", nvme_dir=tmp_path, nvme_bytes="4MiB", secret="other") as s:
        assert s.lookup(s.open_namespace("m"), tokens(12)).block_count == 0  # keys derive from the secret


def test_a_closed_store_refuses_calls(tmp_path):
    s = kvtier.Store(LAYOUT, "256KiB")
    ns = s.open_namespace("m")
    s.close()
    s.close()  # idempotent
    assert s.closed
    with pytest.raises(kvtier.Unavailable, match="closed"):
        s.lookup(ns, tokens(4))


def test_client_errors_name_the_cause(daemon_factory, tmp_path):
    with pytest.raises(kvtier.Unavailable, match="cannot connect"):
        kvtier.Client(tmp_path / "nobody.sock")
    with pytest.raises(ConnectionError):  # Unavailable is also a ConnectionError
        kvtier.Client(tmp_path / "nobody.sock")
    d = daemon_factory(layout={"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4},
                       host_bytes="256KiB", nvme_bytes="8MiB", tenants="""
[[tenant]]
name = "ours"
salt = "ours-1"
everyone = true
[[tenant]]
name = "theirs"
salt = "theirs-1"
uids = [54321]
""")
    with kvtier.Client(d.socket, window_bytes=1 << 20, name="pytest") as c:
        assert c.tenants == ["ours"]
        assert c.window_bytes == 1 << 20
        assert c.layout == LAYOUT
        c.open_namespace("m", tenant="ours")
        with pytest.raises(kvtier.PermissionDenied, match="theirs") as e:
            c.open_namespace("m", tenant="theirs")
        assert e.value.code == "permission_denied" and isinstance(e.value, PermissionError)
        with pytest.raises(kvtier.InvalidArgument):
            c.register_memory(torch.zeros(1024, dtype=torch.uint8))  # plain host memory cannot be shared
    assert c.closed
    d.kill()
    with pytest.raises(kvtier.Unavailable):
        kvtier.Client(d.socket)


def test_a_daemon_that_dies_fails_calls_with_unavailable(daemon_factory):
    d = daemon_factory(layout={"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4},
                       host_bytes="1MiB", nvme_bytes="8MiB")  # 256 slots: the tests' blocks stay in DRAM
    c = kvtier.Client(d.socket)
    ns = c.open_namespace("m")
    c.save(ns, tokens(8), kv_blocks(2))
    d.kill()
    with pytest.raises(kvtier.Unavailable):
        c.lookup(ns, tokens(8))
    c.close()


def test_one_client_from_many_threads(client):
    ns = client.open_namespace("threads")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            toks = tokens(40, start=1000 * i)
            src = kv_blocks(10, seed=i)
            for _ in range(5):
                client.save(ns, toks, src)
                with client.lookup(ns, toks) as m:
                    assert m.block_count == 10
                    dst = torch.empty_like(src)
                    client.load(m, dst).wait()
                    assert torch.equal(dst, src)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_error_classes_cover_every_status_code():
    from kvtier import _native

    for code in _native.status_codes():
        if code == "ok":
            continue
        cls = kvtier.error_class(code)
        assert cls is not kvtier.Error, f"no exception class for {code}"
        err = cls("why")
        assert isinstance(err, kvtier.Error) and err.code == code and str(err) == f"{code}: why"


def test_load_of_some_layers_writes_only_those(kv):
    ns = kv.open_namespace("layers")
    src = kv_blocks(3, seed=9)
    kv.save(ns, tokens(12), src)
    per_layer = LAYOUT.bytes_per_block_layer // 2  # bf16 elements of one layer of one block
    with kv.lookup(ns, tokens(12)) as m:
        for layers in (range(1, 2), (1, 1), range(0, 1)):
            dst = torch.full_like(src, 7.0)
            h = kv.load(m, dst, layers=layers)
            h.wait_layer(0)
            h.wait()
            begin = layers.start if isinstance(layers, range) else layers[0]
            for layer in range(LAYOUT.num_layers):
                part = slice(layer * per_layer, (layer + 1) * per_layer)
                if layer == begin:
                    assert torch.equal(dst[:, part], src[:, part])
                else:
                    assert bool((dst[:, part] == 7.0).all())
        for bad in (range(2, 3), (1, 5), range(0, 2, 2), (0, 0)):
            with pytest.raises(kvtier.InvalidArgument):
                kv.load(m, torch.empty_like(src), layers=bad)


class CudaArrayInterface:
    """An object that offers only __cuda_array_interface__ (as CuPy, Numba or JAX arrays do). Its
    pointer here is host memory: on a machine without a GPU kvtier's device memory is emulated in
    host memory, so the whole path but a CUDA copy runs."""

    def __init__(self, array: np.ndarray, readonly: bool = False, strides=None) -> None:
        self.array = array
        self.__cuda_array_interface__ = {
            "data": (array.ctypes.data, readonly), "shape": array.shape, "typestr": array.dtype.str,
            "strides": strides, "version": 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host pointer stands for device memory only without a GPU")
def test_objects_with_the_cuda_array_interface(kv):
    ns = kv.open_namespace("cai")
    raw = kv_blocks(2, seed=4).view(torch.uint8).numpy().copy()
    assert kv.save(ns, tokens(8), CudaArrayInterface(raw)) == 2
    back = np.zeros_like(raw)
    with kv.lookup(ns, tokens(8)) as m:
        kv.load(m, CudaArrayInterface(back)).wait()
        assert np.array_equal(back, raw)
        with pytest.raises(kvtier.InvalidArgument, match="read-only"):
            kv.load(m, CudaArrayInterface(back, readonly=True))
        with pytest.raises(kvtier.InvalidArgument, match="not contiguous"):
            kv.load(m, CudaArrayInterface(back, strides=(1, 2)))
    with pytest.raises(kvtier.InvalidArgument, match="element type"):
        kv.save(ns, tokens(8), CudaArrayInterface(np.zeros((2, BPB // 4), dtype=np.float32)))


def _vllm_cpu_block(engine: torch.Tensor, piece: int, per_page: int, bt: int) -> torch.Tensor:
    """Canonical [K|V][token][head][dim] of one block, read out of a vLLM CPU-backend layer tensor
    [pages][heads][page_tokens][2*dim] with torch: K transposed [dim][page_tokens], then V."""
    page, t0 = divmod(piece, per_page)
    heads, pt, dim = engine.shape[1], engine.shape[2], engine.shape[3] // 2
    flat = engine[page].reshape(heads, 2, pt * dim)
    k = flat[:, 0].reshape(heads, dim, pt).transpose(1, 2)  # [heads][tokens][dim]
    v = flat[:, 1].reshape(heads, pt, dim)
    return torch.stack([k, v])[:, :, t0 * bt:(t0 + 1) * bt].transpose(1, 2)  # [2][tokens][heads][dim]


def test_vllm_cpu_pages_of_two_blocks_and_a_load_that_skips_cached_blocks(kv):
    ns = kv.open_namespace("vllm-cpu")
    pages, bt, heads, dim, per_page = 5, 4, 2, 8, 2
    layers = [torch.randn(pages, heads, bt * per_page, 2 * dim).to(torch.bfloat16) for _ in range(2)]
    pieces = [7, 8, 2, 3]  # blocks 0..3: the second half of page 3, page 4, then page 1
    assert kv.save(ns, tokens(16), kvtier.PagedKv("vllm_cpu", layers, pieces, page_tokens=bt * per_page)) == 4
    canonical = torch.zeros(4, 2, 2, bt, heads, dim, dtype=torch.bfloat16)
    with kv.lookup(ns, tokens(16)) as m:
        kv.load(m, canonical.view(4, -1)).wait()
        for b, piece in enumerate(pieces):
            for layer in range(2):
                assert torch.equal(canonical[b, layer], _vllm_cpu_block(layers[layer], piece, per_page, bt))
        # An engine that holds blocks 0-1 itself loads blocks 2-3 only, into pages it chose.
        other = [torch.zeros_like(t) for t in layers]
        kv.load(m, kvtier.PagedKv("vllm_cpu", other, [0, 1], page_tokens=bt * per_page), first_block=2).wait()
        for layer in range(2):
            for b, piece in ((2, 0), (3, 1)):
                assert torch.equal(_vllm_cpu_block(other[layer], piece, per_page, bt), canonical[b, layer])
            assert not other[layer][1:].any()  # nothing else written
        with pytest.raises(kvtier.InvalidArgument, match="first_block 5 is past"):
            kv.load(m, canonical.view(4, -1)[:1], first_block=5)
    with pytest.raises(kvtier.InvalidArgument, match="not whole blocks"):
        kv.save(ns, tokens(16), kvtier.PagedKv("vllm_cpu", layers, [0], page_tokens=6))
    with pytest.raises(kvtier.InvalidArgument, match="block piece 10"):
        kv.save(ns, tokens(16), kvtier.PagedKv("vllm_cpu", layers, [10, 0, 1, 2], page_tokens=bt * per_page))


def test_restore_or_recompute_offers_only_what_restores_faster_than_the_declared_prefill(kv):
    t = tokens(40)  # 10 blocks
    kv.save(kv.open_namespace("rr"), t, kv_blocks(10, seed=7))
    # A slow engine (10 tokens/s: 0.4 s a block to recompute) gets everything, and the estimate
    # of what it saves.
    ns = kv.open_namespace("rr", prefill_tokens_per_second=10.0)
    with kv.lookup(ns, t) as m:
        assert (m.block_count, m.held_back_blocks) == (10, 0)
        assert 3.0 < m.seconds_saved <= 4.0
        out = torch.empty(10, ELEMS, dtype=torch.bfloat16)
        kv.load(m, out).wait()
        assert torch.equal(out, kv_blocks(10, seed=7))
    # An engine faster than any restore (1e15 tokens/s) is offered nothing: no lease, nothing pinned.
    ns = kv.open_namespace("rr", prefill_tokens_per_second=1e15)
    with kv.lookup(ns, t) as m:
        assert (m.block_count, m.held_back_blocks, m.lease) == (0, 10, 0)
        assert "held_back=10" in repr(m)
    # Declaring nothing again (0) offers everything; a bad speed is refused.
    ns = kv.open_namespace("rr", prefill_tokens_per_second=0.0)
    with kv.lookup(ns, t) as m:
        assert (m.block_count, m.held_back_blocks, m.seconds_saved) == (10, 0, 0.0)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(kvtier.InvalidArgument):
            kv.open_namespace("rr", prefill_tokens_per_second=bad)
    assert "kvtier_restore_held_back_tokens_total 40" in kv.metrics_text()
