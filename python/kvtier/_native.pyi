from collections.abc import Sequence
from typing import Annotated

import numpy
from numpy.typing import NDArray


class KvLayout:
    """The shape and element type of a model's KV cache."""

    @staticmethod
    def standard(layers: int, kv_heads: int, head_dim: int, dtype: str = 'bf16', block_tokens: int = 16) -> KvLayout:
        """A standard-attention layout (MHA, GQA, MQA)."""

    @staticmethod
    def from_hf_config(config_json: str, block_tokens: int = 16, dtype: str | None = None) -> KvLayout:
        """
        The layout a Hugging Face config.json (its text) describes; dtype overrides the config's.
        """

    @property
    def num_layers(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def dtype(self) -> str: ...

    @property
    def block_tokens(self) -> int: ...

    @property
    def latent(self) -> bool: ...

    @property
    def bytes_per_block(self) -> int: ...

    @property
    def bytes_per_block_layer(self) -> int: ...

    @property
    def bytes_per_token(self) -> int: ...

    @property
    def fingerprint(self) -> int: ...

    def __eq__(self, arg: KvLayout, /) -> bool: ...

    def __repr__(self) -> str: ...

class PagedKv:
    """
    An engine's paged KV cache: one tensor per layer (vllm: [2][pages][tokens][heads][dim], flashinfer_nhd: [pages][2][tokens][heads][dim], flashinfer_hnd: [pages][2][heads][tokens][dim], vllm_cpu: [pages][heads][tokens * 2 * dim] with K transposed inside each (page, head), host memory only) and where each block is. page_tokens: tokens per page, a multiple of the layout's block_tokens (0: equal); pages then count block-sized pieces: piece p is tokens [(p % r) * block_tokens, +block_tokens) of page p // r, r = page_tokens // block_tokens.
    """

    def __init__(self, layout: str, layers: list, pages: Sequence[int], page_tokens: int = 0) -> None: ...

    @property
    def layout(self) -> str: ...

    @property
    def layers(self) -> list: ...

    @property
    def pages(self) -> list[int]: ...

    @property
    def page_tokens(self) -> int: ...

class Match:
    """The longest cached prefix of a prompt, under a lease until released."""

    @property
    def tokens(self) -> int:
        """Matched tokens (whole blocks)."""

    @property
    def block_count(self) -> int: ...

    def __len__(self) -> int: ...

    @property
    def lease(self) -> int: ...

    @property
    def held_back_blocks(self) -> int:
        """
        Cached blocks after the match not offered: slower to restore than to recompute at the namespace's declared prefill speed (0 when it declares none).
        """

    @property
    def seconds_saved(self) -> float:
        """
        Estimated recompute minus restore time of the matched blocks (0 without a declared speed).
        """

    @property
    def released(self) -> bool: ...

    @property
    def tiers(self) -> list[str]:
        """The fastest tier of each matched block: 'hbm', 'host' or 'nvme'."""

    def residency(self, block: int) -> list[str]:
        """Every tier block `block` is resident in."""

    def release(self) -> None:
        """Ends the lease (once; later calls do nothing)."""

    def __enter__(self) -> object: ...

    def __exit__(self, exc_type: object | None = None, exc: object | None = None, tb: object | None = None) -> None:
        """
        Releases the lease; a client whose daemon went away has none left, and that is not an error.
        """

    def __repr__(self) -> str: ...

class TransferHandle:
    """One load in flight; per-layer completion."""

    def wait(self) -> None:
        """Blocks until every layer is in place; raises the load's error."""

    def wait_layer(self, layer: int) -> None:
        """Blocks until layer `layer` of every block is in place."""

    def done(self) -> bool:
        """True once the load is final."""

    def cancel(self) -> None:
        """Stops after the slice in flight."""

    @property
    def state(self) -> str: ...

    @property
    def layers_done(self) -> int: ...

    @property
    def bytes_done(self) -> int: ...

class KvStore:
    """
    The calls every kvtier store answers (Client through kvtierd, Store in-process).
    """

    @property
    def layout(self) -> KvLayout: ...

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...

    def open_namespace(self, model: str, tenant: str = '', adapter: str = '', revision: str = '', prefill_tokens_per_second: float = 0.0) -> int: ...

    def lookup(self, ns: int, tokens: object) -> Match: ...

    def inspect(self, top_prefixes: int = 10) -> str: ...

    def export_list(self, restart: bool, roots: Sequence[str], max_blocks: int = 256) -> str: ...

    def export_read(self, keys: Sequence[str]) -> list: ...

    def doctor(self, model: str, tenant: str, adapter: str, revision: str, tokens: object, engine_block_tokens: int = 0, engine_layout_fingerprint: int = 0) -> str: ...

    def load(self, match: Match, dst: object, layer_begin: int = 0, layer_count: int = 0, first_block: int = 0) -> TransferHandle: ...

    def release(self, match: Match) -> None: ...

    def save(self, ns: int, tokens: object, src: object, first_block: int = 0, priority: str = 'normal') -> int: ...

    def prefetch(self, ns: int, tokens: object, to: str = 'host') -> int: ...

    def pin(self, ns: int, tokens: object, priority: str = 'retained') -> int: ...

    def unpin(self, ns: int, tokens: object) -> int: ...

    def object_put(self, ns: int, key: bytes, data: object, priority: str = 'normal') -> bool: ...

    def object_get(self, ns: int, key: bytes, out: object | None = None) -> object: ...

    def object_exists(self, ns: int, keys: Sequence[bytes]) -> int: ...

    def object_remove(self, ns: int, keys: Sequence[bytes]) -> int: ...

    def metrics_text(self) -> str: ...

class NativeClient(KvStore):
    @property
    def client_id(self) -> int: ...

    @property
    def tenants(self) -> list[str]: ...

    @property
    def window_bytes(self) -> int: ...

    def register_memory(self, tensor: object) -> None: ...

    def allocate_shared_host(self, bytes: int) -> Annotated[NDArray[numpy.uint8], dict(shape=(None,))]: ...

    def unregister_memory(self, tensor: object) -> None: ...

def connect(socket_path: str | None = None, window_bytes: int | None = None, name: str | None = None) -> NativeClient: ...

def open_store(layout: KvLayout, host_bytes: object, nvme_dir: str | None = None, nvme_bytes: object = 0, secret: str = '', write_through: bool = False) -> KvStore: ...

def inspect_data_dir(dir: str) -> str:
    """kvtier inspect of a data dir no kvtierd holds: JSON text."""

def walk_data_dir(dir: str, want_namespace: object | None, want_block: object | None, emit: object) -> dict:
    """
    kvtier export: every namespace's blocks of a data dir no kvtierd holds, depth first, payloads verified.
    """

def checksum(*args) -> int:
    """
    XXH3-64 of the bytes objects back to back, as kvtier's slot and archive checksums.
    """

def check_nvme_tier(dir: str, repair: bool = False, progress: object | None = None, max_listed: int = 1000) -> dict:
    """
    kvtier fsck: checks an NVMe tier (or a kvtierd data dir) no kvtierd holds; a dict of findings.
    """

def status_codes() -> list[str]: ...
