"""kvtier as vLLM's storage layer: a v1 KV connector (``KVConnectorBase_V1``), loaded out of tree::

    from vllm.config import KVTransferConfig
    KVTransferConfig(kv_connector="KvtierConnector", kv_connector_module_path="kvtier.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"socket": "/run/kvtier.sock"})

(``kv_load_failure_policy="recompute"``: vLLM's default, "fail", fails a request whose load fails.)

The scheduler side asks kvtierd for the cached prefix beyond what vLLM's own prefix cache holds
(under a lease, so the blocks stay until the worker has them); the worker side loads those blocks
into vLLM's paged KV cache before the forward pass, waits per layer (``wait_for_layer_load``), and
saves each request's new full prompt blocks after it, on a thread of its own. A failed load is
reported through ``get_block_ids_with_load_errors`` and vLLM recomputes those blocks; a kvtierd
that is down makes every lookup a miss and every save a no-op, and the connector reconnects.

Extra config (all optional): ``socket`` (default ``$KVTIER_SOCKET`` or kvtier's default socket),
``tenant`` (for requests without a ``cache_salt``; default ``""``), ``model`` and ``revision``
(the namespace; default vLLM's model and revision, or a digest of a local model's weight files),
``priority`` of saves (``normal``), ``load`` / ``save`` (default true), ``window_bytes``,
``retry_seconds`` (how long after a failure to leave kvtierd alone, default 1),
``prefill_tokens_per_second`` (restore or recompute: by default the worker times its prefill
steps and the scheduler declares the speed to kvtierd, which then offers only the cached prefix
that restores faster than vLLM recomputes it; a number declares that speed instead, 0 turns it off).

See docs/engines.md for the KV layouts, what each backend stores, and the limits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

import kvtier
from kvtier import PagedKv
from kvtier._prefill import PrefillSpeed

from vllm.distributed.kv_events import MEDIUM_STORAGE, BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                              KVConnectorMetadata,
                                                              KVConnectorRole,
                                                              KVConnectorWorkerMetadata)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KvtierConnector", "KvtierConnectorMetadata", "KvtierConnectorStats", "ConnectorStats",
           "stored_model_id", "cpu_attention_path"]

log = logging.getLogger("kvtier.vllm")

_DOWN = object()  # KvtierConnector._call: kvtierd could not be reached

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "int8",
           getattr(torch, "float8_e4m3fn", None): "fp8_e4m3"}


@dataclasses.dataclass
class _Transfer:
    """One request's load or save, as the scheduler hands it to the workers."""
    req_id: str
    model: str
    tenant: str
    adapter: str
    revision: str
    tokens: list[int]          # the prompt's tokens up to the last block moved
    begin: int                 # kvtier blocks [begin, end) move
    end: int
    vllm_blocks: list[int]     # vLLM's block ids covering kvtier blocks [0, end)


@dataclasses.dataclass
class KvtierConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = dataclasses.field(default_factory=list)
    saves: list[_Transfer] = dataclasses.field(default_factory=list)
    step_tokens: int = 0  # tokens this step computes (the worker times the steps that load nothing)


@dataclasses.dataclass
class _SavesDone(KVConnectorWorkerMetadata):
    """Worker → scheduler: the saves (request id, end block) that finished, and whether they did;
    and the prefill speed the worker measured lately (0: nothing new)."""
    done: list[tuple[str, int, bool]] = dataclasses.field(default_factory=list)
    prefill_tokens_per_second: float = 0.0

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "KVConnectorWorkerMetadata":
        assert isinstance(other, _SavesDone)
        return _SavesDone(self.done + other.done,
                          max(self.prefill_tokens_per_second, other.prefill_tokens_per_second))


# Restore or recompute: steps of at least this many tokens, loading nothing, time the prefill.
_MIN_TIMED_TOKENS = 128


_STAT_KEYS = ("loaded_tokens", "load_failures", "saved_blocks", "save_bytes", "save_failures", "unavailable")


@dataclasses.dataclass
class KvtierConnectorStats(KVConnectorStats):
    """The worker's counts over one of vLLM's logging intervals (vLLM's connector stats)."""

    def reset(self) -> None:
        self.data = {k: 0 for k in _STAT_KEYS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {f"kvtier_{k}": self.data.get(k, 0) for k in _STAT_KEYS}

    def is_empty(self) -> bool:
        return not any(self.data.get(k, 0) for k in _STAT_KEYS)


@dataclasses.dataclass
class ConnectorStats:
    """What a connector did, cumulative. The scheduler side counts lookups and hits; the worker
    side counts loads, failures and saves."""
    lookups: int = 0
    hit_requests: int = 0
    hit_tokens: int = 0
    loaded_tokens: int = 0
    load_failures: int = 0
    saved_blocks: int = 0
    save_bytes: int = 0
    save_failures: int = 0
    unavailable: int = 0


@dataclasses.dataclass
class _Request:
    tokens: list[int]
    model: str
    tenant: str
    adapter: str
    request: Any = None           # vLLM's Request (its block hashes, for KV events)
    block_ids: list[int] = dataclasses.field(default_factory=list)
    in_kvtier: int = 0            # kvtier blocks of the prompt known to be cached there
    load: tuple[int, int] | None = None
    saving: bool = False          # a save was handed to the workers: its blocks stay until reported


class _Link:
    """A kvtierd connection that is dropped when a call fails on it and made again by the next
    call; a connect that fails is not tried again for ``retry_seconds``, so a daemon that is down
    costs one failed connect per interval and never an exception in vLLM's loop."""

    def __init__(self, socket: str, window_bytes: int | None, retry_seconds: float, name: str,
                 stats: ConnectorStats) -> None:
        self.socket, self.window_bytes, self.retry, self.name = socket, window_bytes, retry_seconds, name
        self.stats = stats
        self.client: kvtier.Client | None = None
        self.namespaces: dict[tuple[str, str, str, str], int] = {}
        self.refused: set[tuple[str, str, str, str]] = set()  # tenants this process may not use
        self.down_until = 0.0
        self.fresh = False  # the client was made by the last get(): no call has used it yet
        self.lock = threading.Lock()
        self.speed = 0.0  # the prefill speed namespaces are opened with (restore or recompute)

    def get(self) -> kvtier.Client | None:
        if self.client is not None and not self.client.closed:
            self.fresh = False
            return self.client
        if time.monotonic() < self.down_until:
            return None
        try:
            self.client = kvtier.Client(self.socket, self.window_bytes, name=self.name)
        except kvtier.Error as e:
            self.stats.unavailable += 1
            log.warning("kvtier: kvtierd at %s unavailable (%s); serving without it for %.1f s",
                        self.socket, e, self.retry)
            self.down_until = time.monotonic() + self.retry
            return None
        self.namespaces.clear()
        self.fresh = True
        return self.client

    def failed(self, e: BaseException) -> bool:
        """After an error: a connection error drops the client, and the next get() connects again.
        True when the call is worth one more try at once: the connection it failed on was an old
        one (kvtierd restarted since), not one just made."""
        if not isinstance(e, (kvtier.Unavailable, kvtier.ProtocolError, kvtier.IoError)):
            return False
        log.warning("kvtier: lost kvtierd at %s (%s)", self.socket, e)
        if self.client is not None:
            try:
                self.client.close()
            except kvtier.Error:
                pass
        self.client = None
        return not self.fresh

    def namespace(self, client: kvtier.Client, model: str, tenant: str, adapter: str, revision: str) -> int | None:
        key = (model, tenant, adapter, revision)
        if key in self.refused:
            return None
        ns = self.namespaces.get(key)
        if ns is None:
            try:
                ns = client.open_namespace(model, tenant, adapter, revision, prefill_tokens_per_second=self.speed)
            except kvtier.PermissionDenied as e:
                log.warning("kvtier: tenant %r refused (%s): its requests neither hit nor save", tenant, e)
                self.refused.add(key)
                return None
            self.namespaces[key] = ns
        return ns

    def declare(self, speed: float) -> None:
        """Declares a new prefill speed for every namespace this connection opened (and those it
        opens later); a connection that fails is dropped, and the next one opens with the speed."""
        self.speed = speed
        if self.client is None or self.client.closed:
            return
        try:
            for key in list(self.namespaces):
                self.client.open_namespace(*key, prefill_tokens_per_second=speed)
        except kvtier.Error as e:
            self.failed(e)


def _cpu_isa(vllm_config: "VllmConfig") -> str | None:
    """The code path vLLM's CPU attention backend takes on this machine ("vec", "amx", "vec16",
    "neon", ...), which sets how it lays out K and V inside a block; None off the CPU backend."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    m = vllm_config.model_config
    return cpu_attention_path(m.dtype, vllm_config.cache_config.block_size, m.get_head_size(),
                              vllm_config.cache_config.cache_dtype)


def stored_model_id(model: str, isa: str | None) -> str:
    """The namespace model id under which the connector keeps ``model``'s blocks: ``model`` for
    canonical blocks, ``model#vllm-cpu-<isa>`` for raw ones of vLLM's CPU path ``isa`` (see
    :func:`cpu_attention_path`)."""
    return model if isa in (None, "vec") else f"{model}#vllm-cpu-{isa}"


def cpu_attention_path(dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str = "auto") -> str:
    """The path vLLM's CPU attention takes on this machine for these settings ("vec", "amx", ...)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, cache_dtype)


def _layout_name(kv: torch.Tensor, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 raw: bool) -> str:
    """Which kvtier engine layout one layer's KV tensor has, from its device and shape."""
    shape = tuple(kv.shape)
    if kv.device.type == "cpu" and shape == (num_blocks, kv_heads, block_size, 2 * head_dim):
        # vLLM's CPU attention backend. Its "vec" path keeps K transposed inside each block and
        # head, then V (kvtier's vllm_cpu unpack). Other paths (AMX tiles, ...) lay a block out
        # their own way: those blocks are kept byte for byte, each page's bytes split into kvtier
        # blocks by flashinfer_nhd's bijection (whole pages only), in a namespace of their own.
        return "flashinfer_nhd" if raw else "vllm_cpu"
    if kv.device.type == "cuda" and shape == (2, num_blocks, block_size, kv_heads, head_dim):
        return "vllm"  # FlashAttention and the other [2, blocks, block_size, heads, dim] backends
    raise kvtier.LayoutMismatch(
        f"vLLM's KV cache tensor of shape {shape} on {kv.device.type} is not a layout kvtier knows "
        f"(CPU [blocks, kv_heads, block_size, 2*head_dim] or CUDA [2, blocks, block_size, kv_heads, head_dim]); "
        "see docs/engines.md")


class KvtierConnector(KVConnectorBase_V1):
    """kvtier as vLLM's KV storage: a hit in kvtierd is a prefix vLLM does not recompute."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        model_config = vllm_config.model_config
        self._block_size = vllm_config.cache_config.block_size
        self._model = str(extra.get("model") or model_config.served_model_name or model_config.model)
        # The scheduler names the namespace; each transfer carries its revision to the workers, so
        # only one process reads a local model's weight files for the digest.
        self._revision = ""
        if role == KVConnectorRole.SCHEDULER:
            self._revision = str(extra.get("revision") or model_config.revision or
                                 self._weights_digest(model_config.model))
        self._default_tenant = str(extra.get("tenant", ""))
        self._priority = str(extra.get("priority", "normal"))
        self._do_load = bool(extra.get("load", True))
        self._do_save = bool(extra.get("save", True))
        socket = str(extra.get("socket") or os.environ.get("KVTIER_SOCKET", kvtier.DEFAULT_SOCKET))
        window = extra.get("window_bytes")
        retry = float(extra.get("retry_seconds", 1.0))
        declared = extra.get("prefill_tokens_per_second")
        self._measure_prefill = declared is None
        self.stats = ConnectorStats()
        side = "scheduler" if role == KVConnectorRole.SCHEDULER else "worker"
        # The scheduler only looks up and releases: a window of one page, not 256 MiB of address space.
        window_bytes = int(window) if window else (4096 if role == KVConnectorRole.SCHEDULER else None)
        self._link = _Link(socket, window_bytes, retry, f"vllm-{side}-{os.getpid()}", self.stats)
        self._link.speed = float(declared or 0.0)
        if vllm_config.parallel_config.tensor_parallel_size * vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise kvtier.InvalidArgument("kvtier's vLLM connector supports one worker (tensor and pipeline "
                                         "parallel size 1) for now")
        self._kv_heads = model_config.get_num_kv_heads(vllm_config.parallel_config)
        self._head_dim = model_config.get_head_size()
        self._num_layers = model_config.get_num_layers(vllm_config.parallel_config)
        self._bt = 0  # kvtier's block_tokens, once connected
        if role == KVConnectorRole.SCHEDULER and getattr(self._kv_transfer_config, "kv_load_failure_policy",
                                                         "recompute") != "recompute":
            log.warning("kvtier: kv_load_failure_policy is %r: a request whose load from kvtierd fails is failed "
                        "instead of recomputed; set kv_load_failure_policy='recompute' in the KVTransferConfig",
                        self._kv_transfer_config.kv_load_failure_policy)
        # Raw mode: vLLM's CPU backend on a path kvtier cannot unpack to its canonical layout.
        self._isa = _cpu_isa(vllm_config)
        self._raw = self._isa is not None and self._isa != "vec"
        self._model = stored_model_id(self._model, self._isa)  # raw blocks never mix with canonical ones
        self._client()  # a kvtierd that is up but does not fit this model fails vLLM's start here
        # scheduler side
        self._requests: dict[str, _Request] = {}
        self._matches: dict[str, kvtier.Match] = {}
        self._pending_hits: dict[str, tuple[int, int]] = {}  # req -> (vLLM's computed tokens, kvtier blocks held)
        self._release_after_step: list[str] = []
        # worker side
        self._layers: list[torch.Tensor] = []
        self._layer_index: dict[str, int] = {}
        self._engine_layout = ""
        self._loading: list[tuple[kvtier.TransferHandle | None, _Transfer, kvtier.Match | None]] = []
        self._failed_blocks: set[int] = set()
        self._save_link: _Link | None = None
        self._save_queue: queue.Queue[_Transfer | None] = queue.Queue()
        self._save_thread: threading.Thread | None = None
        self._saves_pending: dict[str, int] = {}
        self._saved_reqs: set[str] = set()
        self._finish_wanted: set[str] = set()
        self._save_cv = threading.Condition()
        self._saves_done: list[tuple[str, int, bool]] = []  # for the scheduler's KV events
        self._step_start = 0.0   # restore or recompute: when this step's forward pass began ...
        self._step_tokens = 0    # ... and its tokens, when it loads nothing and is long enough to time
        # The worker's moving average (sent in its metadata once it moved); on the scheduler, the
        # speed it received and declared.
        self._prefill = PrefillSpeed()
        self._speed_to_send = 0.0
        self._stats_reported = ConnectorStats()
        self._events: list[Any] = []  # scheduler side: KV events not yet taken
        self._pending_events: dict[tuple[str, int], BlockStored] = {}

    @staticmethod
    def _weights_digest(model: str) -> str:
        if Path(model).is_dir():
            try:
                from kvtier.hf import weights_revision
                return weights_revision(model)
            except kvtier.Error:
                return ""
        return ""

    # ---- shared ------------------------------------------------------------------------------
    def _client(self, link: _Link | None = None) -> kvtier.Client | None:
        link = link or self._link
        client = link.get()
        if client is None:
            return None
        if not self._bt:
            layout = client.layout
            self._check_layout(layout)
            self._bt = layout.block_tokens
        return client

    def _call(self, link: _Link, fn: Any) -> Any:
        """``fn(client)`` on ``link``'s connection, once more on a new connection when the old one
        died (kvtierd restarted since). Returns what ``fn`` returns, or ``_DOWN`` when kvtierd
        cannot be reached now; raises the kvtier.Error that ended it otherwise."""
        for retry in (True, False):
            client = self._client(link)
            if client is None:
                return _DOWN
            try:
                return fn(client)
            except kvtier.Error as e:
                if not (link.failed(e) and retry):
                    raise
        return _DOWN  # not reached: the second try is on a connection just made

    @property
    def _per_page(self) -> int:
        """kvtier blocks per vLLM block."""
        return self._block_size // self._bt

    def _check_layout(self, layout: kvtier.KvLayout) -> None:
        want = (self._num_layers, self._kv_heads, self._head_dim)
        have = (layout.num_layers, layout.num_kv_heads, layout.head_dim)
        if layout.latent or want != have:
            raise kvtier.LayoutMismatch(
                f"kvtierd's layout {layout!r} does not fit this model ({want[0]} layers, {want[1]} kv heads, "
                f"head dim {want[2]}): start kvtierd with the model's config.json ([layout] hf_config)")
        if self._block_size % layout.block_tokens:
            raise kvtier.LayoutMismatch(
                f"vLLM's block size {self._block_size} is not a multiple of kvtierd's block_tokens "
                f"{layout.block_tokens}")
        dtype = _DTYPES.get(self._vllm_config.model_config.dtype)
        if dtype != layout.dtype:
            raise kvtier.LayoutMismatch(f"vLLM's KV dtype {self._vllm_config.model_config.dtype} is not "
                                        f"kvtierd's {layout.dtype}")

    def _identity(self, request: "Request") -> tuple[str, str, str]:
        tenant = request.cache_salt if getattr(request, "cache_salt", None) else self._default_tenant
        lora = getattr(request, "lora_request", None)
        adapter = lora.lora_name if lora is not None else ""
        return self._model, tenant, adapter

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        self._drop_match(request.request_id)
        if not self._do_load:
            return 0, False
        tokens = list(request.prompt_token_ids or [])
        limit = (len(tokens) - 1) // self._block_size * self._block_size  # vLLM computes at least one token
        if limit <= num_computed_tokens:
            # Nothing to load, but what kvtier holds decides what is saved: a lookup whose
            # lease ends at once (about 20 µs) keeps a prefix vLLM had cached from being saved again.
            limit = len(tokens)
        model, tenant, adapter = self._identity(request)

        def lookup(client: kvtier.Client) -> kvtier.Match | None:
            ns = self._link.namespace(client, model, tenant, adapter, self._revision)
            if ns is None:
                return None
            self.stats.lookups += 1
            return client.lookup(ns, tokens[:limit])

        with self._link.lock:
            try:
                match = self._call(self._link, lookup)
            except kvtier.Error:
                return 0, False
        if match is None or match is _DOWN:
            return 0, False
        held = match.block_count
        hit = min(match.tokens, (len(tokens) - 1)) // self._block_size * self._block_size
        self._pending_hits[request.request_id] = (num_computed_tokens, held)
        if hit <= num_computed_tokens:
            match.release()
            return 0, False
        self._matches[request.request_id] = match
        return hit - num_computed_tokens, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        rid = request.request_id
        st = self._requests.get(rid)
        if st is None:
            model, tenant, adapter = self._identity(request)
            st = self._requests[rid] = _Request(list(request.prompt_token_ids or []), model, tenant, adapter, request)
        computed, held = self._pending_hits.pop(rid, (0, 0))
        st.in_kvtier = max(st.in_kvtier, held)
        if num_external_tokens > 0 and self._bt:
            st.load = (computed // self._bt, (computed + num_external_tokens) // self._bt)
            self.stats.hit_requests += 1
            self.stats.hit_tokens += num_external_tokens
        elif rid in self._matches:
            self._drop_match(rid)

    def _transfer(self, rid: str, st: _Request, begin: int, end: int) -> _Transfer:
        per_page = self._per_page
        need = (end + per_page - 1) // per_page
        return _Transfer(rid, st.model, st.tenant, st.adapter, self._revision, st.tokens[:end * self._bt], begin,
                         end, st.block_ids[:need])

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KvtierConnectorMetadata:
        meta = KvtierConnectorMetadata(step_tokens=int(getattr(scheduler_output, "total_num_scheduled_tokens", 0)))
        progress: list[tuple[str, int]] = []  # (req, tokens computed once this step ran)
        for new in scheduler_output.scheduled_new_reqs:
            st = self._requests.get(new.req_id)
            if st is None:
                continue
            st.block_ids = list(new.block_ids[0])
            progress.append((new.req_id, new.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self._requests.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            progress.append((rid, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)))
        for rid, computed_after in progress:
            st = self._requests[rid]
            if st.load is not None:
                begin, end = st.load
                st.load = None
                if end > begin:
                    meta.loads.append(self._transfer(rid, st, begin, end))
                    self._release_after_step.append(rid)
            if self._do_save and self._bt:
                savable = min(computed_after, len(st.tokens)) // self._bt
                if self._raw:  # raw pages move whole: a half-computed page is not saved
                    savable = savable // self._per_page * self._per_page
                if savable > st.in_kvtier:
                    meta.saves.append(self._transfer(rid, st, st.in_kvtier, savable))
                    self._note_event(rid, st, st.in_kvtier, savable)
                    st.in_kvtier = savable
                    st.saving = True
        return meta

    def _note_event(self, rid: str, st: _Request, begin: int, end: int) -> None:
        """The BlockStored event of the whole vLLM blocks this save adds, sent once it is done."""
        hashes = getattr(st.request, "block_hashes", None) if st.request is not None else None
        if not hashes:
            return
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        first = -(-begin * self._bt // self._block_size)  # the first vLLM block not already announced
        last = end * self._bt // self._block_size
        if last <= first or last > len(hashes):
            return
        lora = getattr(st.request, "lora_request", None)
        self._pending_events[(rid, end)] = BlockStored(
            block_hashes=[maybe_convert_block_hash(h) for h in hashes[first:last]],
            parent_block_hash=maybe_convert_block_hash(hashes[first - 1]) if first > 0 else None,
            token_ids=st.tokens[first * self._block_size:last * self._block_size], block_size=self._block_size,
            lora_id=lora.lora_int_id if lora is not None else None, medium=MEDIUM_STORAGE,
            lora_name=lora.lora_name if lora is not None else None)

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, _SavesDone):
            for rid, end, ok in meta.done:
                event = self._pending_events.pop((rid, end), None)
                if ok and event is not None:
                    self._events.append(event)
            self._prefill.set(meta.prefill_tokens_per_second)
            if self._measure_prefill and self._prefill.due():
                with self._link.lock:
                    self._link.declare(self._prefill.measured)
                self._prefill.declared = self._prefill.measured
        # The step that loaded has run: its workers hold their own leases no longer, so neither
        # need the scheduler's.
        for rid in self._release_after_step:
            self._drop_match(rid)
        self._release_after_step.clear()

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._drop_match(rid)
        self._pending_hits.pop(rid, None)
        st = self._requests.pop(rid, None)
        return (st is not None and st.saving), None

    def _drop_match(self, rid: str) -> None:
        match = self._matches.pop(rid, None)
        if match is None:
            return
        with self._link.lock:
            self._release_quietly(match)

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        self._layer_index = {name: i for i, name in enumerate(names)}
        self._layers = [kv_caches[n] for n in names]
        first = self._layers[0]
        num_blocks = first.shape[0] if first.device.type == "cpu" else first.shape[1]
        self._engine_layout = _layout_name(first, num_blocks, self._block_size, self._kv_heads, self._head_dim,
                                           self._raw)
        if len(self._layers) != self._num_layers:
            raise kvtier.LayoutMismatch(f"{len(self._layers)} KV cache tensors for a model of {self._num_layers} layers")
        for kv in self._layers:
            if not kv.is_contiguous():
                raise kvtier.LayoutMismatch("kvtier needs each layer's KV cache tensor contiguous")
        client = self._client()
        if client is not None and self._engine_layout == "vllm":
            for kv in self._layers:  # loads land straight in GPU memory, saves leave from it
                client.register_memory(kv)

    def _paged(self, t: _Transfer, begin: int) -> PagedKv:
        per_page = self._per_page
        pieces = [t.vllm_blocks[j // per_page] * per_page + j % per_page for j in range(begin, t.end)]
        return PagedKv(self._engine_layout, self._layers, pieces, self._block_size)

    def _failed(self, t: _Transfer, from_block: int) -> None:
        self.stats.load_failures += 1
        self._failed_blocks.update(t.vllm_blocks[j // self._per_page] for j in range(from_block, t.end))

    def _lookup_for_load(self, client: kvtier.Client, ns: int, t: _Transfer) -> kvtier.Match:
        """The worker's own lease on the blocks it is about to load (tests override it to fault)."""
        return client.lookup(ns, t.tokens)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # vLLM binds a step's metadata before its forward pass and calls wait_for_save after it. A
        # step that loads nothing times vLLM's own compute: its tokens per second are the speed a
        # restore must beat (a step that loads would count the restore's time as compute).
        meta = connector_metadata
        timed = isinstance(meta, KvtierConnectorMetadata) and not meta.loads and meta.step_tokens >= _MIN_TIMED_TOKENS
        self._step_tokens = meta.step_tokens if timed else 0
        self._step_start = time.perf_counter()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KvtierConnectorMetadata) or not meta.loads:
            return
        with self._link.lock:
            for t in meta.loads:
                self._start_load(t)

    def _start_load(self, t: _Transfer) -> None:
        def load(client: kvtier.Client):
            ns = self._link.namespace(client, t.model, t.tenant, t.adapter, t.revision)
            if ns is None:
                return None
            match = self._lookup_for_load(client, ns, t)
            have = min(match.block_count, t.end)
            try:
                handle = None
                if have > t.begin:
                    part = dataclasses.replace(t, end=have)
                    handle = client.load(match, self._paged(part, t.begin), first_block=t.begin)
                else:
                    match.release()
            except kvtier.Error:
                self._release_quietly(match)
                raise
            return match, have, handle

        try:
            got = self._call(self._link, load)
        except kvtier.Error as e:
            log.warning("kvtier: load of request %s failed (%s): vLLM recomputes it", t.req_id, e)
            self._failed(t, t.begin)
            return
        if got is None or got is _DOWN:
            self._failed(t, t.begin)
            return
        match, have, handle = got
        if have < t.end:  # evicted since the scheduler looked: vLLM recomputes the rest
            self._failed(t, max(have, t.begin))
        if handle is not None:
            self._loading.append((handle, dataclasses.replace(t, end=have), match))

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for i, (handle, t, match) in enumerate(self._loading):
            if handle is None:
                continue
            try:
                handle.wait_layer(layer)
            except kvtier.Error as e:
                log.warning("kvtier: load of request %s failed at layer %d (%s): vLLM recomputes it",
                            t.req_id, layer, e)
                self._failed(t, t.begin)
                self._loading[i] = (None, t, match)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # kvtier saves whole blocks (every layer) once the step's forward pass is done

    def _finish_loads(self) -> None:
        for handle, t, match in self._loading:
            if handle is not None:
                try:
                    handle.wait()
                    self.stats.loaded_tokens += (t.end - t.begin) * self._bt
                except kvtier.Error as e:
                    log.warning("kvtier: load of request %s failed (%s): vLLM recomputes it", t.req_id, e)
                    self._failed(t, t.begin)
            if match is not None:
                self._release_quietly(match)
        self._loading.clear()

    def _release_quietly(self, match: kvtier.Match) -> None:
        try:
            match.release()
        except kvtier.Error as e:
            self._link.failed(e)

    def _time_step(self) -> None:
        if not self._measure_prefill or not self._step_tokens:
            return
        seconds = time.perf_counter() - self._step_start
        self._step_tokens, tokens = 0, self._step_tokens
        self._prefill.add(tokens, seconds)
        self._speed_to_send = self._prefill.measured

    def wait_for_save(self) -> None:
        self._time_step()
        self._finish_loads()
        meta = self._connector_metadata
        if not isinstance(meta, KvtierConnectorMetadata) or not meta.saves:
            return
        if self._save_thread is None:
            self._save_link = _Link(self._link.socket, self._link.window_bytes, self._link.retry,
                                    f"vllm-saver-{os.getpid()}", self.stats)
            self._save_thread = threading.Thread(target=self._save_loop, name="kvtier-save", daemon=True)
            self._save_thread.start()
        with self._save_cv:
            for t in meta.saves:
                self._saved_reqs.add(t.req_id)
                self._saves_pending[t.req_id] = self._saves_pending.get(t.req_id, 0) + 1
        for t in meta.saves:
            self._save_queue.put(t)

    def _save_loop(self) -> None:
        assert self._save_link is not None
        while (t := self._save_queue.get()) is not None:
            ok = False
            try:
                ok = self._save_one(t)
            finally:
                with self._save_cv:
                    self._saves_pending[t.req_id] -= 1
                    self._saves_done.append((t.req_id, t.end, ok))
                    self._save_cv.notify_all()

    def _save_one(self, t: _Transfer) -> bool:
        link = self._save_link
        assert link is not None

        def save(client: kvtier.Client) -> int | None:
            ns = link.namespace(client, t.model, t.tenant, t.adapter, t.revision)
            if ns is None:
                return None
            try:
                saved = client.save(ns, t.tokens, self._paged(t, t.begin), first_block=t.begin, priority=self._priority)
            except kvtier.InvalidArgument:
                # The earlier blocks left kvtier since the lookup (evicted): save the whole prefix.
                saved = client.save(ns, t.tokens, self._paged(t, 0), first_block=0, priority=self._priority)
            self.stats.saved_blocks += saved
            self.stats.save_bytes += saved * client.layout.bytes_per_block
            return saved

        try:
            saved = self._call(link, save)
        except kvtier.Error as e:
            self.stats.save_failures += 1
            log.warning("kvtier: save of request %s failed (%s)", t.req_id, e)
            return False
        if saved is _DOWN:
            self.stats.save_failures += 1
            return False
        return saved is not None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._save_cv:
            self._finish_wanted.update(r for r in finished_req_ids if r in self._saved_reqs)
            done = {r for r in self._finish_wanted if self._saves_pending.get(r, 0) == 0}
            for r in done:
                self._finish_wanted.discard(r)
                self._saved_reqs.discard(r)
                self._saves_pending.pop(r, None)
        return (done or None), None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        with self._save_cv:
            done, self._saves_done = self._saves_done, []
        speed, self._speed_to_send = self._speed_to_send, 0.0
        return _SavesDone(done, speed) if done or speed else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        now = dataclasses.asdict(self.stats)
        last = dataclasses.asdict(self._stats_reported)
        delta = {k: now[k] - last[k] for k in _STAT_KEYS}
        if not any(delta.values()):
            return None
        self._stats_reported = dataclasses.replace(self.stats)
        return KvtierConnectorStats(data=delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvtierConnectorStats(data=dict(data)) if data is not None else KvtierConnectorStats(
            data={k: 0 for k in _STAT_KEYS})

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_saves(self, timeout: float | None = None) -> bool:
        """Blocks until every save handed to the save thread is done (tests, shutdown)."""
        with self._save_cv:
            return self._save_cv.wait_for(lambda: all(v == 0 for v in self._saves_pending.values()), timeout)

    def shutdown(self) -> None:
        if self._save_thread is not None:
            self._save_queue.put(None)
            self._save_thread.join()
            self._save_thread = None
        for link in (self._link, self._save_link):
            if link is not None and link.client is not None:
                try:
                    link.client.close()
                except kvtier.Error:
                    pass

    def take_events(self) -> Iterable[Any]:
        """BlockStored events (medium STORAGE) for the vLLM blocks kvtier now holds, once their
        save finished, so a KV-aware router sees kvtier's blocks. kvtier does not report its own
        evictions to vLLM: no BlockRemoved events."""
        events, self._events = self._events, []
        return events
