"""Hugging Face transformers and kvtier: save a prompt's KV after prefill, restore a cached prefix
into a fresh cache, and generate from it, so only the rest of the prompt is computed.

The KV moves between a ``DynamicCache`` (per layer ``[batch, kv_heads, tokens, head_dim]``) and
kvtier's canonical blocks (``[layer][K|V][token][kv_head][head_dim]``) by one strided copy per
layer and plane in torch, on the cache's own device (CPU or CUDA). GQA/MQA, bf16, fp16 and fp32.

    kv = kvtier.Client()
    ns = kvtier.hf.open_namespace(kv, model)            # model id + weights revision
    out, info = kvtier.hf.generate(kv, ns, model, input_ids, max_new_tokens=32)
    info.restored_tokens   # tokens whose KV came from kvtier instead of being computed
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import Client, KvLayout, _errors, tokens_list
from ._prefill import PrefillSpeed

_log = logging.getLogger("kvtier.hf")

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def random_llama(path: str | os.PathLike[str], dtype: str = "float32", layers: int = 4, hidden: int = 256,
                 heads: int = 4, kv_heads: int = 2, vocab: int = 1024, intermediate: int | None = None,
                 seed: int = 0, max_positions: int = 8192) -> Path:
    """Writes a Llama-architecture model with random weights to ``path`` (safetensors, no hub), for
    tests, demos and benchmarks. ``initializer_range`` 0.2 makes greedy output vary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return Path(path)


def layout_for(model_or_config: Any, block_tokens: int = 16, dtype: torch.dtype | None = None) -> KvLayout:
    """The KV layout of a model (or its config): layers, kv heads, head dim from the config, the
    dtype of the model's weights (or ``dtype``)."""
    config = _config_of(model_or_config)
    if dtype is None:
        dtype = getattr(model_or_config, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = _DTYPE_NAMES.get(dtype) if dtype is not None else None
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else json.dumps(config)
    return KvLayout.from_hf_config(text, block_tokens, name)


def weights_revision(model_or_path: Any) -> str:
    """The weights' revision: the hub commit hash when the model came from the hub, else a SHA-256
    digest (first 16 hex digits) of the weight files' names and contents in the model's folder."""
    config = _config_of(model_or_path)
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    path = Path(model_or_path if isinstance(model_or_path, (str, os.PathLike))
                else getattr(config, "_name_or_path", ""))
    files = sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")) \
        if path.is_dir() else []
    digest = hashlib.sha256()
    if not files:
        if not hasattr(model_or_path, "state_dict"):
            raise _errors.InvalidArgument(f"no weight files under '{path}' to take a revision from: pass revision=")
        # A model built in memory: a digest of its weights themselves.
        for name, t in sorted(model_or_path.state_dict().items()):
            digest.update(name.encode() + b"\0")
            digest.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return "sha256:" + digest.hexdigest()[:16]
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


class _PrefillMeter:
    """Restore or recompute for one namespace of one store: the model's prefill speed as
    :func:`generate` times it, declared to the store whenever it moves by more than a quarter, so
    lookups offer only what restores faster than this model computes."""

    def __init__(self, store: Any, args: dict[str, str]) -> None:
        self.store = weakref.ref(store)
        self.args = args
        self.speed = PrefillSpeed()

    def add(self, tokens: int, seconds: float) -> None:
        self.speed.add(tokens, seconds)
        store = self.store()
        if store is None or not self.speed.due():
            return
        try:  # the same namespace id, its new speed
            store.open_namespace(**self.args, prefill_tokens_per_second=self.speed.measured)
            self.speed.declared = self.speed.measured
        except _errors.Error as e:  # a daemon that went away: the next generate declares it
            _log.debug("kvtier: could not declare the prefill speed: %s", e)


_meters: "weakref.WeakKeyDictionary[Any, dict[int, _PrefillMeter]]" = weakref.WeakKeyDictionary()
_meters_lock = threading.Lock()


def open_namespace(store: Any, model: Any, tenant: str = "", adapter: str = "",
                   revision: str | None = None, model_id: str | None = None,
                   prefill_tokens_per_second: float | None = None) -> int:
    """A namespace for ``model``: its id (``model_id``, else the config's ``_name_or_path``) and
    its weights' revision (``revision``, else :func:`weights_revision`). Checks that the model's KV
    layout is the store's.

    Restore or recompute: with ``prefill_tokens_per_second=None`` (the default) :func:`generate`
    times each prefill and declares the model's speed, so a lookup offers only the cached prefix
    that restores faster than the model would compute it (until the first prefill is timed, every
    cached block is offered). A number declares that speed instead; 0 turns it off."""
    config = _config_of(model)
    mine = layout_for(model, store.layout.block_tokens)
    if mine != store.layout:
        raise _errors.LayoutMismatch(f"the model's KV layout {mine!r} is not the store's {store.layout!r}")
    name = model_id or getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    rev = revision if revision is not None else weights_revision(model)
    args = {"model": name, "tenant": tenant, "adapter": adapter, "revision": rev}
    ns = store.open_namespace(**args, prefill_tokens_per_second=prefill_tokens_per_second or 0.0)
    with _meters_lock:
        meters = _meters.setdefault(store, {})
        if prefill_tokens_per_second is None:
            meters.setdefault(ns, _PrefillMeter(store, args))
        else:
            meters.pop(ns, None)
    return ns


def _meter(store: Any, ns: int) -> _PrefillMeter | None:
    with _meters_lock:
        return _meters.get(store, {}).get(ns)


class _FirstToken:
    """A logits processor that notes when generate's first token is chosen: the prefill's end."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class _Staging:
    """One client's reusable host buffer shared with kvtierd (Client.shared_host): canonical blocks
    restored into it or saved from it cross one copy, not two (no window). Grows as needed; one
    user at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf: Any = None


_staging: "weakref.WeakKeyDictionary[Any, _Staging]" = weakref.WeakKeyDictionary()
_staging_lock = threading.Lock()


@contextlib.contextmanager
def _blocks_buffer(store: Any, n: int, dtype: torch.dtype, device: Any):
    """A [n, bytes_per_block / itemsize] tensor to restore into or save from: in memory shared with
    kvtierd for a client on the CPU, else a plain tensor on `device`."""
    layout = store.layout
    elements = layout.bytes_per_block // torch.tensor([], dtype=dtype).element_size()
    if not isinstance(store, Client) or torch.device(device).type != "cpu":
        yield torch.empty((n, elements), dtype=dtype, device=device)
        return
    with _staging_lock:
        st = _staging.setdefault(store, _Staging())
    with st.lock:
        need = n * layout.bytes_per_block
        if st.buf is None or st.buf.nbytes < need:
            st.buf = None  # the old one goes first
            st.buf = store.shared_host(need)
        yield torch.from_numpy(st.buf)[:need].view(dtype).view(n, elements)


def _dims(layout: KvLayout) -> tuple[int, int, int, int]:
    if layout.latent:
        raise _errors.InvalidArgument("kvtier.hf handles standard attention; MLA caches are not supported yet")
    return layout.num_layers, layout.block_tokens, layout.num_kv_heads, layout.head_dim


def cache_to_blocks(cache: Any, layout: KvLayout, first_block: int, end_block: int,
                    batch_index: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``[first_block, end_block)`` of a cache as one contiguous tensor
    ``[blocks, bytes_per_block / itemsize]`` in kvtier's canonical layout, on the cache's device
    (or written into ``out``, of that shape and the cache's dtype)."""
    layers, bt, heads, dim = _dims(layout)
    if len(cache.layers) != layers:
        raise _errors.LayoutMismatch(f"the cache has {len(cache.layers)} layers; the layout {layers}")
    n = end_block - first_block
    keys0 = cache.layers[0].keys
    if out is None:
        out = torch.empty((n, layers, 2, bt, heads, dim), dtype=keys0.dtype, device=keys0.device)
    else:
        out = out.view(n, layers, 2, bt, heads, dim)
    lo, hi = first_block * bt, end_block * bt
    for i, layer in enumerate(cache.layers):
        for plane, t in enumerate((layer.keys, layer.values)):
            if t.shape[1] != heads or t.shape[3] != dim or t.shape[2] < hi:
                raise _errors.LayoutMismatch(
                    f"layer {i}: cache tensor {tuple(t.shape)} does not hold {hi} tokens of {heads}x{dim}")
            # [heads, tokens, dim] -> [blocks, block_tokens, heads, dim]
            out[:, i, plane] = t[batch_index, :, lo:hi].reshape(heads, n, bt, dim).permute(1, 2, 0, 3)
    return out.view(n, -1)


def blocks_to_layer(blocks: torch.Tensor, layout: KvLayout, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s K and V of canonical blocks, as ``[1, kv_heads, tokens, head_dim]``."""
    layers, bt, heads, dim = _dims(layout)
    n = blocks.shape[0]
    view = blocks.view(n, layers, 2, bt, heads, dim)
    k = view[:, layer, 0].permute(2, 0, 1, 3).reshape(1, heads, n * bt, dim)
    v = view[:, layer, 1].permute(2, 0, 1, 3).reshape(1, heads, n * bt, dim)
    return k, v


def save_cache(store: Any, ns: int, tokens: Sequence[int], cache: Any, first_block: int = 0,
               priority: str = "normal", batch_index: int = 0) -> int:
    """Saves the full blocks of ``tokens`` (from ``first_block``) whose KV ``cache`` holds — after
    a prefill, or after ``generate`` (its prompt positions). Returns the blocks newly saved."""
    layout = store.layout
    tokens = tokens_list(tokens)
    end_block = min(len(tokens), cache.get_seq_length()) // layout.block_tokens
    if end_block <= first_block:
        return 0
    keys0 = cache.layers[0].keys
    with _blocks_buffer(store, end_block - first_block, keys0.dtype, keys0.device) as buf:
        blocks = cache_to_blocks(cache, layout, first_block, end_block, batch_index, out=buf)
        return store.save(ns, tokens[: end_block * layout.block_tokens], blocks, first_block=first_block,
                          priority=priority)


@dataclass
class Restored:
    """What :func:`restore_cache` brought back."""
    cache: Any                 # a DynamicCache holding the restored prefix (empty on a miss)
    tokens: int                # tokens restored (whole blocks); 0 on a miss
    tiers: list[str]           # the fastest tier each restored block came from
    error: str | None = None   # why a match could not be used (a failed load is a miss)
    held_back_blocks: int = 0  # cached blocks not offered: slower to restore than to recompute


def restore_cache(store: Any, ns: int, tokens: Sequence[int], config: Any, device: Any = "cpu",
                  dtype: torch.dtype | None = None) -> Restored:
    """Looks up the cached prefix of ``tokens`` (leaving at least one token to compute), loads it
    and returns it in a fresh ``DynamicCache``. A load that fails (a corrupt block, the daemon
    gone) is a miss: the cache comes back empty and the caller computes everything."""
    from transformers import DynamicCache

    layout = store.layout
    config = _config_of(config)
    dtype = dtype or _TORCH_DTYPES.get(layout.dtype)
    if dtype is None:
        raise _errors.InvalidArgument(f"kvtier.hf restores bf16, fp16 or fp32 KV, not {layout.dtype}")
    tokens = tokens_list(tokens)
    fresh = DynamicCache(config=config)
    if len(tokens) < 2:
        return Restored(fresh, 0, [])
    try:
        match = store.lookup(ns, tokens[: len(tokens) - 1])
    except _errors.Error as e:  # the daemon is down: compute everything
        _log.warning("kvtier lookup failed, recomputing: %s", e)
        return Restored(fresh, 0, [], str(e))
    with match:
        n = match.block_count
        if n == 0:
            return Restored(fresh, 0, [], held_back_blocks=match.held_back_blocks)
        cache = DynamicCache(config=config)
        with _blocks_buffer(store, n, dtype, device) as blocks:
            try:
                handle = store.load(match, blocks)
                for layer in range(layout.num_layers):
                    handle.wait_layer(layer)  # later layers still arriving while this one is placed
                    k, v = blocks_to_layer(blocks, layout, layer)
                    cache.update(k.contiguous(), v.contiguous(), layer)  # copies: the buffer is reused
                handle.wait()
            except _errors.Error as e:
                _log.warning("kvtier load failed, recomputing: %s", e)
                return Restored(fresh, 0, [], str(e))
        return Restored(cache, match.tokens, match.tiers, held_back_blocks=match.held_back_blocks)


@dataclass
class GenerateInfo:
    prompt_tokens: int
    restored_tokens: int   # prompt tokens whose KV came from kvtier
    saved_blocks: int      # prompt blocks saved after the run
    tiers: list[str]
    error: str | None = None
    held_back_blocks: int = 0   # cached blocks recomputed as faster than restoring them
    prefill_seconds: float = 0.0  # the prefill of the tokens not restored, as timed


def generate(store: Any, ns: int, model: Any, input_ids: torch.Tensor, save: bool = True,
             priority: str = "normal", **generate_kwargs: Any) -> tuple[Any, GenerateInfo]:
    """``model.generate`` from kvtier's cached prefix of the prompt (batch of one): restores what is
    cached, computes the rest, generates, then saves the prompt's new full blocks. Returns
    generate's output and what was restored and saved."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise _errors.InvalidArgument("kvtier.hf.generate takes a batch of one prompt: input_ids [1, tokens]")
    from transformers import LogitsProcessorList

    prompt = input_ids[0].tolist()
    restored = restore_cache(store, ns, prompt, model.config, device=input_ids.device, dtype=model.dtype)
    cache = restored.cache
    first = _FirstToken()
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(first)
    start = time.perf_counter()
    out = model.generate(input_ids, past_key_values=cache, logits_processor=processors, **generate_kwargs)
    prefill_s = (first.at - start) if first.at is not None else 0.0
    computed = len(prompt) - restored.tokens
    meter = _meter(store, ns)
    if meter is not None and computed >= store.layout.block_tokens:
        meter.add(computed, prefill_s)
    saved = 0
    if save:
        try:
            saved = save_cache(store, ns, prompt, cache, first_block=restored.tokens // store.layout.block_tokens,
                               priority=priority)
        except _errors.Error as e:  # a full or absent store never fails the request
            _log.warning("kvtier save failed: %s", e)
    return out, GenerateInfo(len(prompt), restored.tokens, saved, restored.tiers, restored.error,
                             restored.held_back_blocks, prefill_s)
