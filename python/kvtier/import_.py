"""``kvtier import``: load a ``kvtier export`` archive into a kvtierd, or into a data dir offline.

    kvtier import warm.kvtar                                  # into the running kvtierd ($KVTIER_SOCKET)
    kvtier import warm.kvtar --socket /run/kvtier.sock --tenant team-a
    kvtier import warm.kvtar --config /etc/kvtier/kvtierd.toml   # offline: a data dir no kvtierd holds
    python -m kvtier.import_ warm.kvtar --data-dir /var/lib/kvtier --json

The whole archive is read and checked first (every record's checksum, its format version, its
order, its END count): a truncated archive, another format version or a flipped byte is refused
with the problem named, and nothing is imported. So is an archive whose KV layout is not the
destination's. Then every block is saved again under the destination's deployment secret and
tenant (the archive never holds a secret), at its priority class (or ``--priority``); a block the
destination has already is skipped. Blocks are committed one by one, so an interrupted import
leaves whole blocks only, and a rerun continues where it stopped.

A namespace keeps the archive's tenant unless ``--tenant`` names another. Offline, ``--config``
gives the destination's data dir, secret and tenants (their salts); ``--data-dir`` alone is a
kvtierd without a config file (its secret in DATA_DIR/secret, the shared tenant only). Offline
saves are written through to NVMe as they go.

Exit status: 0 every block imported or present; 1 some blocks failed (the summary says why);
2 the archive or the usage is refused; 3 the destination cannot be reached or opened.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import kvtier

from . import _cli, archive
from ._cli import UsageError

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2, 3


@dataclasses.dataclass
class Summary:
    archive: str = ""
    namespaces: int = 0
    blocks: int = 0          # in the archive
    imported: int = 0        # saved anew
    present: int = 0         # the destination had them already: skipped
    failed: int = 0
    bytes_imported: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # reason → blocks


def layout_matches(header: dict[str, Any], layout: Any) -> str | None:
    """None when the archive's layout is ``layout``; else why not."""
    want = header["layout"]
    have = archive.layout_dict(layout)
    if header.get("layout_fingerprint") == layout.fingerprint and all(want[k] == have[k] for k in
                                                                       ("num_layers", "num_kv_heads", "head_dim",
                                                                        "dtype", "block_tokens", "latent")):
        return None
    return (f"the archive holds blocks of layout {want.get('description')}, the destination's is {layout!r}: "
            "blocks of one layout never serve another")


def import_archive(store: Any, path: str, tenant: str | None = None, priority: str | None = None,
                   progress: Any = None, tenant_salts: dict[str, str] | None = None) -> Summary:
    """Checks the whole archive, then imports it into ``store`` (a :class:`kvtier.Client` or an
    in-process :class:`kvtier.Store`). Raises archive.ArchiveError (nothing imported) when the
    archive is refused. ``tenant_salts``: for an in-process store standing for a kvtierd, each
    tenant name's salt (an in-process store's tenant is its salt)."""
    start = time.perf_counter()
    header = archive.verify(path)
    why = layout_matches(header, store.layout)
    if why:
        raise archive.ArchiveError(why)
    s = Summary(archive=path, blocks=header["counts"]["blocks"])
    failures: collections.Counter[str] = collections.Counter()
    bpb = store.layout.bytes_per_block

    def open_ns(rec: dict[str, str]) -> int:
        name = tenant if tenant is not None else rec["tenant"]
        if tenant_salts is not None:
            if name not in tenant_salts:
                raise UsageError(f"the destination's config has no tenant named '{name}' (--tenant)")
            name = tenant_salts[name]
        return store.open_namespace(rec["model"], tenant=name, adapter=rec["adapter"], revision=rec["revision"])

    # Every namespace first: a tenant the destination refuses stops the import before any block.
    for rec in header["namespaces"]:
        open_ns(rec)
    ns = None
    stack: list[tuple[bytes, list[int], bool]] = []  # (source key, tokens, imported or present) per depth
    with open(path, "rb") as f:
        for kind, rec in archive.read(f):
            if kind == archive.NAMESPACE:
                ns = open_ns(rec)
                stack = []
                s.namespaces += 1
                continue
            if kind != archive.BLOCK:
                continue
            b: archive.Block = rec
            d = b.block_index  # archive.read checked the order: the stack holds its ancestors
            del stack[d:]
            parent_ok = d == 0 or stack[d - 1][2]
            stack.append((b.key, b.tokens, False))
            reason = None
            if not parent_ok:
                reason = "its parent block was not imported"
            elif b.extras:
                reason = "blocks with extras are not imported yet"
            elif len(b.payload) != bpb:
                reason = f"a payload of {len(b.payload)} bytes, not {bpb}"
            else:
                tokens = [t for _, blk, _ in stack for t in blk]
                try:
                    saved = store.save(ns, tokens, np.frombuffer(b.payload, dtype=np.uint8).reshape(1, bpb), first_block=d,
                                       priority=priority or b.priority)
                except kvtier.Unavailable:
                    raise
                except kvtier.Error as e:
                    reason = str(e)
                else:
                    if saved:
                        s.imported += 1
                        s.bytes_imported += len(b.payload)
                    else:
                        s.present += 1
                    stack[-1] = (b.key, b.tokens, True)
            if reason:
                s.failed += 1
                failures[reason] += 1
            if progress is not None:
                progress.update(1)
    s.failures = dict(failures)
    s.seconds = time.perf_counter() - start
    return s


def _offline_store(args: argparse.Namespace, layout: Any) -> tuple[Any, dict[str, str] | None]:
    """The destination data dir opened in this process, as its kvtierd would key blocks."""
    salts: dict[str, str] | None = None
    secret: str | None = None
    if args.config:
        try:
            cfg = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"--config {args.config}: {e}") from e
        data_dir = Path(cfg.get("data_dir", "/var/lib/kvtier"))
        if cfg.get("secret"):
            secret = cfg["secret"]
        elif cfg.get("secret_file"):
            secret = Path(cfg["secret_file"]).read_text().rstrip("\r\n \t")
        tenants = cfg.get("tenant", [])
        salts = {t["name"]: t.get("salt", "") for t in tenants} if tenants else {"": ""}
    else:
        data_dir = Path(args.data_dir)
        salts = {"": ""}
    if secret is None:
        try:
            secret = (data_dir / "secret").read_text().rstrip("\r\n \t")
        except OSError as e:
            raise UsageError(f"{data_dir}/secret: {e.strerror} (start kvtierd on the data dir once to create it, "
                             "or give --config)") from e
    nvme = data_dir / "nvme"
    slots = sorted(nvme.glob("slots.*"))
    if not slots:
        raise UsageError(f"{nvme} holds no NVMe tier to import into (start kvtierd on the data dir once)")
    nvme_bytes = sum(p.stat().st_size for p in slots)
    store = kvtier.Store(layout, "64MiB", nvme_dir=nvme, nvme_bytes=nvme_bytes, secret=secret, write_through=True)
    return store, salts


def _archive_layout(header: dict[str, Any]) -> Any:
    lay = header["layout"]
    if lay.get("latent"):
        raise UsageError("offline import of an MLA (latent) layout: import through kvtierd instead")
    return kvtier.KvLayout.standard(lay["num_layers"], lay["num_kv_heads"], lay["head_dim"], lay["dtype"],
                                    lay["block_tokens"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtier import", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 ok, 1 some blocks failed, 2 archive or usage refused, "
                                        "3 the destination unavailable.")
    ap.add_argument("archive", help="a kvtier export archive")
    dest = ap.add_mutually_exclusive_group()
    dest.add_argument("--socket", default=None, help="kvtierd's socket (default $KVTIER_SOCKET or kvtier's default)")
    dest.add_argument("--config", default=None, help="offline: the destination kvtierd's config file")
    dest.add_argument("--data-dir", default=None, help="offline: a data dir of a kvtierd without a config file")
    ap.add_argument("--tenant", default=None, help="import every namespace under this tenant (default the archive's)")
    ap.add_argument("--priority", default=None, choices=archive.PRIORITIES,
                    help="save at this class (default each block's own)")
    _cli.add_quiet_arg(ap)
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    try:
        header = archive.verify(args.archive)
        if args.config or args.data_dir:
            store, salts = _offline_store(args, _archive_layout(header))
        else:
            store, salts = kvtier.Client(args.socket, name="kvtier-import"), None
        with store, _cli.progress_bar(args.quiet, "kvtier import", header["counts"]["blocks"], unit="block") as bar:
            s = import_archive(store, args.archive, args.tenant, args.priority, bar, salts)
    except (archive.ArchiveError, UsageError) as e:
        print(f"kvtier import: refused, nothing imported: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except (kvtier.Unavailable, kvtier.IoError) as e:
        print(f"kvtier import: the destination cannot be reached or opened: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (kvtier.LayoutMismatch, kvtier.InvalidArgument, kvtier.PermissionDenied) as e:
        print(f"kvtier import: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as e:  # after kvtier's errors, some of which are OSErrors too
        print(f"kvtier import: {args.archive}: {e.strerror or e}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        _cli.print_json(dataclasses.asdict(s))
    else:
        print(f"kvtier import: {s.blocks} blocks of {s.namespaces} namespaces from {s.archive} in {s.seconds:.1f} s: "
              f"{s.imported} imported ({_cli.mib(s.bytes_imported)}), {s.present} present already, {s.failed} failed")
        for why, n in sorted(s.failures.items()):
            print(f"  {n} failed: {why}")
    return EXIT_FAILED if s.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
