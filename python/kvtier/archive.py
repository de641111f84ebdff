"""kvtier's portable archive of KV blocks: what ``kvtier export`` writes and ``kvtier import`` reads.

A file is the magic ``KVTIERA\\n`` and then records, each ``u8 type, u32 length, body, u64 checksum``
(little-endian; the checksum is XXH3-64 of type, length and body, so a flipped byte anywhere or a
cut anywhere is found). The records, in order:

- ``HEADER`` (JSON): ``format_version``, the KV ``layout`` (layers, kv heads, head dim, dtype, block
  tokens, latent) and its ``layout_fingerprint``, ``bytes_per_block``, the kvtier version, when and
  from where it was written. Never the deployment secret: keys are re-derived on import.
- for each namespace, ``NAMESPACE`` (JSON: model, tenant, adapter, revision), then its blocks,
  depth first (a parent right before its subtree), each a ``BLOCK``: block index, priority class,
  its key and its parent's key in the source (to check the order, never used as keys), its tokens,
  its extras and its payload in kvtier's canonical layout;
- ``END`` (JSON): how many namespaces, blocks and payload bytes came before, so a file cut exactly
  at a record boundary is refused too.

Depth-first order lets both sides stream: the writer holds one block, the reader one prompt's
tokens (a stack of blocks up to the current depth).
"""

from __future__ import annotations

import datetime
import json
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

from . import _native

MAGIC = b"KVTIERA\n"
FORMAT_VERSION = 1
HEADER, NAMESPACE, BLOCK, END = 1, 2, 3, 4
_RECORD = struct.Struct("<BI")
_CHECKSUM = struct.Struct("<Q")
_BLOCK_FIXED = struct.Struct("<IB16s16sI")  # block index, priority, key, parent, token count
_MAX_RECORD = 1 << 30
PRIORITIES = ["low", "normal", "high", "retained"]


class ArchiveError(Exception):
    """The archive is not one kvtier can import; the message names the problem and where."""


@dataclass
class Block:
    block_index: int
    priority: str
    key: bytes
    parent: bytes
    tokens: list[int]
    extras: list[bytes]
    payload: bytes


@dataclass
class Counts:
    namespaces: int = 0
    blocks: int = 0
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def layout_dict(layout: Any) -> dict[str, Any]:
    return {"num_layers": layout.num_layers, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "dtype": layout.dtype, "block_tokens": layout.block_tokens, "latent": layout.latent,
            "description": repr(layout)}


class Writer:
    """Writes records to ``f`` (opened for binary writing); ``end()`` finishes the archive."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._f.write(MAGIC)
        self.counts = Counts()
        self._header = False

    def _record(self, kind: int, *body: bytes) -> None:
        """One record whose body is the parts of ``body`` back to back (a payload is written as it is)."""
        head = _RECORD.pack(kind, sum(len(b) for b in body))
        self._f.write(head)
        for b in body:
            self._f.write(b)
        self._f.write(_CHECKSUM.pack(_native.checksum(head, *body)))

    def header(self, layout: Any, source: str) -> None:
        from . import __version__
        self._record(HEADER, json.dumps({
            "format_version": FORMAT_VERSION, "kvtier_version": __version__, "layout": layout_dict(layout),
            "layout_fingerprint": layout.fingerprint, "bytes_per_block": layout.bytes_per_block,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "source": source}).encode())
        self._header = True

    def namespace(self, model: str, tenant: str, adapter: str, revision: str) -> None:
        assert self._header, "header() first"
        self._record(NAMESPACE, json.dumps({"model": model, "tenant": tenant, "adapter": adapter,
                                            "revision": revision}).encode())
        self.counts.namespaces += 1

    def block(self, b: Block) -> None:
        meta = bytearray(_BLOCK_FIXED.pack(b.block_index, PRIORITIES.index(b.priority), b.key, b.parent,
                                           len(b.tokens)))
        meta += struct.pack(f"<{len(b.tokens)}I", *b.tokens)
        meta += struct.pack("<I", len(b.extras))
        for x in b.extras:
            meta += x
        meta += struct.pack("<Q", len(b.payload))
        self._record(BLOCK, bytes(meta), b.payload)
        self.counts.blocks += 1
        self.counts.bytes += len(b.payload)

    def end(self) -> None:
        self._record(END, json.dumps({"namespaces": self.counts.namespaces, "blocks": self.counts.blocks,
                                      "bytes": self.counts.bytes}).encode())


def _json(body: bytes, where: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchiveError(f"{where}: a record that is not JSON ({e})") from e


def _parse_block(body: bytes, where: str) -> Block:
    try:
        index, prio, key, parent, n = _BLOCK_FIXED.unpack_from(body, 0)
        at = _BLOCK_FIXED.size
        tokens = list(struct.unpack_from(f"<{n}I", body, at))
        at += 4 * n
        (ne,) = struct.unpack_from("<I", body, at)
        at += 4
        extras = [body[at + 16 * i: at + 16 * (i + 1)] for i in range(ne)]
        at += 16 * ne
        (plen,) = struct.unpack_from("<Q", body, at)
        at += 8
    except struct.error as e:
        raise ArchiveError(f"{where}: a block record that does not parse ({e})") from e
    if prio >= len(PRIORITIES) or at + plen != len(body) or any(len(x) != 16 for x in extras):
        raise ArchiveError(f"{where}: a block record that does not parse")
    return Block(index, PRIORITIES[prio], key, parent, tokens, extras, body[at:])


def read(f: BinaryIO) -> Iterator[tuple[int, Any]]:
    """The records of an archive, checked as they come: ``(HEADER, dict)``, ``(NAMESPACE, dict)``,
    ``(BLOCK, Block)``, ``(END, dict)``. Raises ArchiveError on the first problem: not an archive,
    another format version, a checksum that fails, a truncation, records out of order."""
    if f.read(len(MAGIC)) != MAGIC:
        raise ArchiveError("not a kvtier archive (no KVTIERA magic at its start)")
    offset, n = len(MAGIC), 0
    counts = Counts()
    seen_header = in_namespace = ended = False
    keys: list[bytes] = []  # the source keys of the blocks above the next one (depth-first order)
    while True:
        head = f.read(_RECORD.size)
        if not head:
            break
        where = f"record {n} at byte {offset}"
        if len(head) < _RECORD.size:
            raise ArchiveError(f"truncated: {where} is cut short in its header")
        kind, length = _RECORD.unpack(head)
        if length > _MAX_RECORD:
            raise ArchiveError(f"{where}: a record of {length} bytes (damaged length)")
        body = f.read(length)
        tail = f.read(_CHECKSUM.size)
        if len(body) < length or len(tail) < _CHECKSUM.size:
            raise ArchiveError(f"truncated: {where} ({length} bytes) is cut short")
        if _CHECKSUM.unpack(tail)[0] != _native.checksum(head, body):
            raise ArchiveError(f"checksum mismatch: {where} is damaged")
        if ended:
            raise ArchiveError(f"{where}: data after the END record")
        if kind == HEADER:
            if seen_header:
                raise ArchiveError(f"{where}: a second header")
            h = _json(body, where)
            if h.get("format_version") != FORMAT_VERSION:
                raise ArchiveError(f"archive format version {h.get('format_version')}: this kvtier reads version "
                                   f"{FORMAT_VERSION}")
            seen_header = True
            yield HEADER, h
        elif not seen_header:
            raise ArchiveError(f"{where}: the first record is not the header")
        elif kind == NAMESPACE:
            in_namespace = True
            keys = []
            counts.namespaces += 1
            yield NAMESPACE, _json(body, where)
        elif kind == BLOCK:
            if not in_namespace:
                raise ArchiveError(f"{where}: a block before any namespace")
            b = _parse_block(body, where)
            d = b.block_index
            if d > len(keys) or (d > 0 and keys[d - 1] != b.parent):
                raise ArchiveError(f"{where}: block {b.key.hex()} at index {d} does not follow its parent: "
                                   "the archive is out of order")
            del keys[d:]
            keys.append(b.key)
            counts.blocks += 1
            counts.bytes += len(b.payload)
            yield BLOCK, b
        elif kind == END:
            e = _json(body, where)
            if (e.get("namespaces"), e.get("blocks"), e.get("bytes")) != (counts.namespaces, counts.blocks,
                                                                           counts.bytes):
                raise ArchiveError(f"{where}: the END record counts {e}, the archive holds "
                                   f"{counts.namespaces} namespaces, {counts.blocks} blocks, {counts.bytes} bytes")
            ended = True
            yield END, e
        else:
            raise ArchiveError(f"{where}: unknown record type {kind}")
        offset += _RECORD.size + length + _CHECKSUM.size
        n += 1
    if not seen_header:
        raise ArchiveError("truncated: the archive holds no header")
    if not ended:
        raise ArchiveError(f"truncated: no END record after {n} records ({offset} bytes)")


def verify(path: str) -> dict[str, Any]:
    """Reads the whole archive once (constant memory but for its namespace list) and returns its
    header, with ``counts`` and ``namespaces``; raises ArchiveError naming the first problem."""
    header: dict[str, Any] = {}
    namespaces: list[dict[str, str]] = []
    with open(path, "rb") as f:
        for kind, rec in read(f):
            if kind == HEADER:
                header = rec
            elif kind == NAMESPACE:
                namespaces.append(rec)
            elif kind == END:
                header["counts"] = rec
    header["namespaces"] = namespaces
    return header
