"""kvtier: a hierarchical KV-cache store for LLM serving (GPU HBM, host DRAM, NVMe).

Two stores answer the same calls (``KvStore`` in C++):

* :class:`Client` talks to a running ``kvtierd`` over its Unix socket; many processes share its
  cache. KV moves through a shared-memory window, or straight into registered GPU memory.
* :class:`Store` is the same tiers inside this process.

A request's life::

    with kvtier.Client() as kv:
        ns = kv.open_namespace("meta-llama/Llama-3.1-8B", revision="0e9e39f")
        with kv.lookup(ns, prompt_tokens) as match:       # the lease ends with the block
            if match.block_count:
                kv.load(match, dst).wait()                # dst: [blocks, bytes_per_block] tensor
        ...compute the rest of the prompt...
        kv.save(ns, prompt_tokens, src)

``dst`` and ``src`` are tensors (torch, numpy: the buffer protocol or DLPack) or objects with
``__cuda_array_interface__``, in kvtier's canonical block layout, or an engine's paged cache
(:class:`PagedKv`). Nothing is copied in Python. :mod:`kvtier.hf` saves and restores the KV cache
of a Hugging Face transformers model.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence, Union

from . import _native
from ._errors import (AlreadyExists, Busy, Cancelled, ChecksumMismatch, Collision, Error,
                      Internal, InvalidArgument, IoError, LayoutMismatch, NotFound,
                      PermissionDenied, ProtocolError, ResourceExhausted, Unavailable,
                      error_class)
from ._native import KvLayout, Match, PagedKv, TransferHandle

__version__: str = _native.__version__

__all__ = [
    "Client", "Store", "KvLayout", "Match", "PagedKv", "TransferHandle", "DEFAULT_SOCKET",
    "Error", "InvalidArgument", "NotFound", "AlreadyExists", "LayoutMismatch", "Collision",
    "Busy", "ResourceExhausted", "IoError", "ChecksumMismatch", "Cancelled", "Unavailable",
    "PermissionDenied", "ProtocolError", "Internal", "error_class", "__version__",
]

#: kvtierd's default socket; the ``KVTIER_SOCKET`` environment variable overrides it.
DEFAULT_SOCKET = "/var/lib/kvtier/kvtierd.sock"

Tokens = Union[Sequence[int], Any]  # a sequence of ints, or a 1-D integer tensor on the CPU
Buffer = Any  # a tensor / buffer / __cuda_array_interface__ object, a list of them, or PagedKv
ObjectKey = Union[bytes, str]  # an object's key: bytes, or a str taken as UTF-8


def _object_key(key: ObjectKey) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class _StoreApi:
    """The calls :class:`Client` and :class:`Store` share (C++ ``kvtier::KvStore``)."""

    _native: _native.KvStore

    @property
    def layout(self) -> KvLayout:
        """The KV layout of every block: layers, kv heads, head dim, dtype, block tokens, bytes."""
        return self._native.layout

    @property
    def closed(self) -> bool:
        return self._native.closed

    def open_namespace(self, model: str, tenant: str = "", adapter: str = "",
                       revision: str = "", prefill_tokens_per_second: float = 0.0) -> int:
        """Resolves a namespace: the model id, a tenant (through kvtierd, one this process's
        identity is bound to, else :class:`PermissionDenied`), a LoRA adapter id, and the weights'
        revision (a commit hash or a digest of the weight files: KV of other weights never
        matches). Returns its id.

        ``prefill_tokens_per_second``, the engine's prefill speed, turns on restore or recompute:
        a lookup then offers only the cached prefix that restores faster than the engine would
        compute it, from each tier's measured restore bandwidth (``Match.held_back_blocks`` says
        what it held back). Opening the namespace again with a new speed replaces it; 0 (the
        default) offers every cached block."""
        return self._native.open_namespace(model, tenant, adapter, revision, prefill_tokens_per_second)

    def lookup(self, ns: int, tokens: Tokens) -> Match:
        """The longest cached prefix of ``tokens`` (whole blocks), under a lease that keeps its
        blocks from eviction until :meth:`release` (or the ``with`` block around the match ends).
        """
        return self._native.lookup(ns, tokens)

    def load(self, match: Match, dst: Buffer, layers: range | tuple[int, int] | None = None,
             first_block: int = 0) -> TransferHandle:
        """Copies the first ``len(dst)`` blocks of a leased match into ``dst``. Returns a handle:
        ``wait()``, ``wait_layer(i)`` (layer ``i`` of every block is in place), ``done()``,
        ``cancel()``. ``dst`` is kept alive until the load is final. A block that fails its
        checksum fails the load with :class:`ChecksumMismatch` and is a miss from then on.

        ``layers``: only these layers (a ``range`` with step 1, or ``(begin, count)``); the blocks
        of ``dst`` stay whole and only those layers are written. The handle's layer ``i`` is then
        layer ``begin + i``.

        ``first_block``: start at this block of the match (``dst`` then holds blocks
        ``first_block, first_block + 1, ...``): the blocks an engine's own cache lacks."""
        if first_block < 0:
            raise InvalidArgument(f"first_block {first_block} is negative")
        if layers is None:
            return self._native.load(match, dst, 0, 0, first_block)
        if isinstance(layers, range):
            if layers.step != 1 or len(layers) == 0:
                raise InvalidArgument("layers must be a non-empty range with step 1")
            begin, count = layers.start, len(layers)
        else:
            begin, count = layers
        if begin < 0 or count <= 0:
            raise InvalidArgument(f"layers ({begin}, {count}) is not a layer range")
        return self._native.load(match, dst, begin, count, first_block)

    def release(self, match: Match) -> None:
        """Ends a match's lease (a no-op when it has none or was released)."""
        self._native.release(match)

    def save(self, ns: int, tokens: Tokens, src: Buffer, first_block: int = 0,
             priority: str = "normal") -> int:
        """Saves the full blocks of ``tokens`` whose KV ``src`` holds: blocks
        ``[first_block, len(tokens) // block_tokens)``; earlier ones must be cached already.
        ``priority``: low, normal, high or retained. Returns the number of blocks newly saved."""
        return self._native.save(ns, tokens, src, first_block, priority)

    def prefetch(self, ns: int, tokens: Tokens, to: str = "host") -> int:
        """Copies the cached prefix of ``tokens`` up into tier ``to`` ('host' or 'hbm') ahead of a
        request. Returns the number of blocks moved."""
        return self._native.prefetch(ns, tokens, to)

    def pin(self, ns: int, tokens: Tokens, priority: str = "retained") -> int:
        """Keeps the cached prefix of ``tokens`` from eviction (through kvtierd, until this client
        disconnects). Returns the number of blocks pinned."""
        return self._native.pin(ns, tokens, priority)

    def unpin(self, ns: int, tokens: Tokens) -> int:
        """Undoes one :meth:`pin` of the cached prefix of ``tokens``."""
        return self._native.unpin(ns, tokens)

    # Key-addressed objects: bytes named by an engine's own keys (SGLang's page hashes, LMCache's
    # chunk keys), kept in a namespace's tiers like its blocks. A key is 1..1024 bytes (a str is
    # taken as UTF-8). Keys name content: a put of a key already stored keeps what is there.

    def object_put(self, ns: int, key: ObjectKey, data: Any, priority: str = "normal") -> bool:
        """Stores ``data`` (bytes or a contiguous host tensor/buffer) under ``key``. True when
        stored, False when the key was stored already (kept as it is). Through kvtierd the object
        must fit the client's window laid out: its bytes and an 8-byte length, in whole blocks."""
        return self._native.object_put(ns, _object_key(key), data, priority)

    def object_get(self, ns: int, key: ObjectKey, out: Any = None) -> bytes | int | None:
        """The object stored under ``key``: its bytes, or with ``out`` (a writable host buffer)
        copied into ``out`` and its length returned. None when it is not stored (never put, or
        evicted: an object loses its tail first and is then not stored). :class:`InvalidArgument`
        when ``out`` is too short."""
        return self._native.object_get(ns, _object_key(key), out)

    def object_exists(self, ns: int, keys: Iterable[ObjectKey]) -> int:
        """How many of ``keys``, from the first, are stored: the first missing one ends the count."""
        return self._native.object_exists(ns, [_object_key(k) for k in keys])

    def object_remove(self, ns: int, keys: Iterable[ObjectKey]) -> int:
        """Erases the objects named by ``keys``; how many of them were stored."""
        return self._native.object_remove(ns, [_object_key(k) for k in keys])

    def inspect(self, top_prefixes: int = 10) -> dict[str, Any]:
        """What the store holds (``kvtier inspect``): namespaces (model, tenant, adapter,
        revision, layout) with blocks and bytes per tier, hits, priorities and NVMe ages; each
        tier's use; the ``top_prefixes`` most reused prefixes. Through kvtierd, for its own uid and
        root only (:class:`PermissionDenied` otherwise). Fields: docs/operations.md."""
        import json
        return json.loads(self._native.inspect(top_prefixes))

    def doctor(self, tokens: Tokens, model: str, tenant: str = "", adapter: str = "", revision: str = "",
               engine_block_tokens: int = 0, engine_layout_fingerprint: int = 0) -> dict[str, Any]:
        """Why a lookup of ``tokens`` in this namespace misses (``kvtier doctor``): its full
        blocks, the cached prefix, where the chain breaks and the ``cause`` (evicted, and from
        which tier; another tenant, revision, adapter or model; a block size or layout the store
        does not have; never saved), and what another namespace would hit. Looks only: no lease,
        no hit counted. Operators only through kvtierd. Fields: docs/operations.md."""
        import json
        return json.loads(self._native.doctor(model, tenant, adapter, revision, tokens, engine_block_tokens,
                                              engine_layout_fingerprint))

    def metrics_text(self) -> str:
        """Counters, occupancy and latencies in Prometheus text format."""
        return self._native.metrics_text()

    def metrics(self) -> dict[str, float]:
        """:meth:`metrics_text` parsed: ``{'name{label="v",...}': value}`` per sample."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def close(self) -> None:
        """Ends this store or connection (kvtierd releases what a client still held). Calls in
        flight finish first; later calls raise :class:`Unavailable`. Idempotent."""
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else repr(self.layout)
        return f"{type(self).__name__}({state})"


class Client(_StoreApi):
    """A connection to kvtierd. Safe to use from several threads (requests queue; one is in flight
    at a time, so use one client per worker for parallel transfers). The GIL is released while a
    call waits.

    ``socket_path``: the daemon's socket (default ``$KVTIER_SOCKET`` or :data:`DEFAULT_SOCKET`).
    ``window_bytes``: the shared-memory window loads and saves move through (default 256 MiB;
    memory is touched only as it is used). Raises :class:`Unavailable` when no daemon listens and
    :class:`PermissionDenied` when the daemon refuses this process's identity.
    """

    _native: _native.NativeClient

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 window_bytes: int | None = None, name: str | None = None) -> None:
        path = os.fspath(socket_path) if socket_path is not None else os.environ.get(
            "KVTIER_SOCKET", DEFAULT_SOCKET)
        self._native = _native.connect(path, window_bytes, name)

    @property
    def client_id(self) -> int:
        """The daemon's name for this connection."""
        return self._native.client_id

    @property
    def tenants(self) -> list[str]:
        """The tenants this process's identity may open."""
        return self._native.tenants

    @property
    def window_bytes(self) -> int:
        return self._native.window_bytes

    def register_memory(self, tensor: Any) -> None:
        """Hands a GPU KV cache (a contiguous CUDA tensor) to kvtierd, so loads into it and saves
        from it skip the window. Unregister it before freeing it."""
        self._native.register_memory(tensor)

    def unregister_memory(self, tensor: Any) -> None:
        self._native.unregister_memory(tensor)

    def export_list(self, restart: bool, roots: Sequence[str] = (), max_blocks: int = 256) -> dict[str, Any]:
        """``kvtier export``'s walk over what kvtierd caches (operators only): a page of up to
        ``max_blocks`` blocks (1..4096), depth first, of the namespaces ``roots`` (hex; every one
        when empty). ``restart`` snapshots the cache and begins a new walk; later calls continue it
        until a page says ``done``. Fields: docs/operations.md."""
        import json
        return json.loads(self._native.export_list(restart, list(roots), max_blocks))

    def export_read(self, keys: Sequence[str]) -> list[tuple[str | None, bytes | None]]:
        """The blocks ``keys`` (hex) whole, each verified against its checksum (operators only):
        per key ``(None, payload)`` or ``(why, None)`` when it is no longer cached or is corrupt."""
        return self._native.export_read(list(keys))

    def shared_host(self, nbytes: int) -> Any:
        """``nbytes`` (rounded up to whole pages) of zero-filled host memory shared with kvtierd,
        as a 1-D numpy uint8 array (``torch.from_numpy`` views it without a copy; needs numpy).
        A load into it or a save from it is one copy between the daemon's tiers and this memory —
        no window, no second copy here. Freed (and unregistered) when the last view of it goes."""
        return self._native.allocate_shared_host(nbytes)


class Store(_StoreApi):
    """kvtier's tiers inside this process: the same calls as :class:`Client`, no daemon.

    ``layout``: a :class:`KvLayout`. ``host_bytes``: the host DRAM tier (bytes or "64MiB").
    ``nvme_dir`` and ``nvme_bytes``: an NVMe tier (slot files and a RocksDB catalog there).
    ``secret``: the deployment secret keys derive from. ``write_through``: persist every save
    to NVMe before it returns (default: write-back).
    """

    def __init__(self, layout: KvLayout, host_bytes: int | str = "256MiB",
                 nvme_dir: str | os.PathLike[str] | None = None, nvme_bytes: int | str = 0,
                 secret: str = "", write_through: bool = False) -> None:
        self._native = _native.open_store(layout, host_bytes,
                                          os.fspath(nvme_dir) if nvme_dir is not None else None,
                                          nvme_bytes, secret, write_through)


def tokens_list(tokens: Iterable[int]) -> list[int]:
    """``tokens`` as a list of ints (tensors and arrays included)."""
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
