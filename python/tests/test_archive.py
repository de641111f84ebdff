"""kvtier export / import between real kvtierds with different secrets: a warmed cache moved to another
"machine" restores byte-identical KV that an engine hits with output identical to recompute; bad
archives (truncated, another format version, another layout, a flipped byte) are refused with the
problem named and nothing imported; an interrupted export or import leaves nothing half-visible and
an import rerun continues; an offline import into a data dir; filters by namespace and prompt; an export
through a running kvtierd holds what it caches in memory too, the same blocks as the offline export."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest
import torch

import kvtier
import kvtier.hf
from kvtier import _native, archive, export, import_

from conftest import BUILD

LAYOUT = {"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4}
BLOCK_ELEMS = 2 * 2 * 4 * 2 * 8


def prompt(i: int, blocks: int = 6) -> list[int]:
    return [1000 * i + t for t in range(4 * blocks)]


def kv_of(i: int, blocks: int = 6) -> torch.Tensor:
    return torch.randn(blocks, BLOCK_ELEMS, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def run(capsys, tool, *args: str) -> tuple[int, dict | None, str]:
    code = tool.main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and out.strip() else None), err


def small(daemon_factory, secret: str, **kw):
    kw = {"layout": LAYOUT, "host_bytes": "1MiB", "nvme_bytes": "4MiB", "secret": secret,
          "extra": {"tiers.nvme_admission_min_uses": 1}, **kw}
    return daemon_factory(**kw)


def fill(d, prompts: dict[int, tuple[str, str]]) -> None:
    """Saves prompt i under (model, revision) for each entry, then stops the daemon gracefully."""
    with kvtier.Client(d.socket) as c:
        for i, (model, rev) in prompts.items():
            ns = c.open_namespace(model, revision=rev)
            c.save(ns, prompt(i), kv_of(i), priority="retained")
    d.stop()


def cached(d, i: int, model: str = "m", rev: str = "r1") -> int:
    """How many blocks of prompt i the daemon serves, after checking their bytes."""
    with kvtier.Client(d.socket) as c:
        ns = c.open_namespace(model, revision=rev)
        with c.lookup(ns, prompt(i)) as m:
            if m.block_count:
                out = torch.zeros(m.block_count, BLOCK_ELEMS, dtype=torch.bfloat16)
                c.load(m, out).wait()
                assert torch.equal(out, kv_of(i)[: m.block_count])
            return m.block_count


@pytest.fixture
def exported(daemon_factory, tmp_path):
    src = small(daemon_factory, "secret-a")
    fill(src, {1: ("m", "r1"), 2: ("m", "r1"), 3: ("other", "r7")})
    path = tmp_path / "cache.kvtar"
    s = export.export_data_dir(str(src.data_dir), str(path))
    assert (s.namespaces, s.blocks, s.corrupt_blocks) == (2, 18, 0)
    return src, path


def test_an_archive_moves_a_cache_to_a_kvtierd_with_another_secret(exported, daemon_factory, capsys):
    src, path = exported
    dst = small(daemon_factory, "secret-b")
    assert cached(dst, 1) == 0
    code, s, _ = run(capsys, import_, str(path), "--socket", dst.socket, "--json")
    assert code == import_.EXIT_OK, s
    assert (s["namespaces"], s["blocks"], s["imported"], s["present"], s["failed"]) == (2, 18, 18, 0, 0)
    assert cached(dst, 1) == 6 and cached(dst, 2) == 6 and cached(dst, 3, "other", "r7") == 6
    # Again: every block is there already.
    code, s, _ = run(capsys, import_, str(path), "--socket", dst.socket, "--json")
    assert (code, s["imported"], s["present"]) == (0, 0, 18)
    # The retained class came along.
    with kvtier.Client(dst.socket) as c:
        r = c.inspect()
    assert {n["model"]: n["by_priority"] for n in r["namespaces"] if n["blocks"]} == {
        "m": {"retained": 12}, "other": {"retained": 6}}

    # Through the kvtier command, with a summary a human reads.
    p = subprocess.run([str(BUILD / "tools" / "kvtier"), "import", str(path), "--socket", dst.socket],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "18 present already" in p.stdout


def test_export_chooses_namespaces_and_prompts_and_refuses_a_live_data_dir(daemon_factory, tmp_path, capsys):
    src = small(daemon_factory, "secret-a")
    fill(src, {1: ("m", "r1"), 2: ("m", "r1"), 3: ("other", "r7")})
    code, s, _ = run(capsys, export, "--data-dir", str(src.data_dir), "-o", str(tmp_path / "m.kvtar"),
                     "--model-id", "m", "--json")
    assert (code, s["namespaces"], s["blocks"]) == (0, 1, 12)
    chosen = tmp_path / "chosen.jsonl"
    chosen.write_text(json.dumps(prompt(2)[:10]) + "\n")  # its first 2 full blocks
    code, s, _ = run(capsys, export, "--data-dir", str(src.data_dir), "-o", str(tmp_path / "p.kvtar"),
                     "--prompts", str(chosen), "--json")
    assert (code, s["blocks"]) == (0, 2)
    code, _, err = run(capsys, export, "--data-dir", str(src.data_dir), "-o", str(tmp_path / "n.kvtar"),
                       "--model-id", "nobody")
    assert code == export.EXIT_USAGE and "nothing to export" in err
    assert not (tmp_path / "n.kvtar").exists()

    src.start()
    code, _, err = run(capsys, export, "--data-dir", str(src.data_dir), "-o", str(tmp_path / "live.kvtar"))
    assert code == export.EXIT_UNAVAILABLE and "LOCK" in err
    assert not (tmp_path / "live.kvtar").exists()


def archive_blocks(path) -> set[tuple]:
    """The archive's blocks, each with its namespace: (model, tenant, adapter, revision, index, key,
    parent, tokens, priority, payload)."""
    out, ns = set(), None
    with open(path, "rb") as f:
        for kind, rec in archive.read(f):
            if kind == archive.NAMESPACE:
                ns = (rec["model"], rec["tenant"], rec["adapter"], rec["revision"])
            elif kind == archive.BLOCK:
                out.add((*ns, rec.block_index, rec.key, rec.parent, tuple(rec.tokens), rec.priority, rec.payload))
    return out


def test_an_export_through_a_running_kvtierd_holds_what_it_caches_in_memory_too(daemon_factory, tmp_path,
                                                                                capsys):
    src = small(daemon_factory, "secret-a")
    with kvtier.Client(src.socket) as c:
        for i, (model, rev) in {1: ("m", "r1"), 2: ("m", "r1"), 3: ("other", "r7")}.items():
            c.save(c.open_namespace(model, revision=rev), prompt(i), kv_of(i), priority="retained")
        tiers = {n["model"]: n["resident_blocks"] for n in c.inspect()["namespaces"] if n["blocks"]}
    assert tiers["m"]["nvme"] == 0 and tiers["m"]["host"] == 12  # write-back: nothing on NVMe yet

    live = tmp_path / "live.kvtar"
    code, s, err = run(capsys, export, "--socket", src.socket, "-o", str(live), "--json")
    assert code == export.EXIT_OK, err
    assert (s["namespaces"], s["blocks"], s["corrupt_blocks"], s["unreachable_blocks"]) == (2, 18, 0, 0)
    assert s["bytes"] == 18 * BLOCK_ELEMS * 2
    # Filters choose as they do offline.
    chosen = tmp_path / "chosen.jsonl"
    chosen.write_text(json.dumps(prompt(2)[:10]) + "\n")  # its first 2 full blocks
    code, s, _ = run(capsys, export, "--socket", src.socket, "-o", str(tmp_path / "p.kvtar"), "--prompts",
                     str(chosen), "--json")
    assert (code, s["namespaces"], s["blocks"]) == (0, 1, 2)
    code, s, _ = run(capsys, export, "--socket", src.socket, "-o", str(tmp_path / "o.kvtar"), "--model-id",
                     "other", "--json")
    assert (code, s["namespaces"], s["blocks"]) == (0, 1, 6)
    code, _, err = run(capsys, export, "--socket", src.socket, "-o", str(tmp_path / "n.kvtar"), "--model-id",
                       "nobody")
    assert code == export.EXIT_USAGE and "nothing to export" in err
    assert not (tmp_path / "n.kvtar").exists()

    # The same blocks, bytes and order rules as the export of the data dir once kvtierd has stopped.
    src.stop()
    offline = tmp_path / "offline.kvtar"
    export.export_data_dir(str(src.data_dir), str(offline))
    assert archive_blocks(live) == archive_blocks(offline) and len(archive_blocks(live)) == 18

    # And it moves the cache: another kvtierd with another secret serves it, bytes checked.
    dst = small(daemon_factory, "secret-b")
    code, s, _ = run(capsys, import_, str(live), "--socket", dst.socket, "--json")
    assert (code, s["imported"], s["failed"]) == (0, 18, 0)
    assert cached(dst, 1) == 6 and cached(dst, 2) == 6 and cached(dst, 3, "other", "r7") == 6

    # No daemon: a clear error, exit 3, no archive.
    gone = tmp_path / "gone.kvtar"
    code, _, err = run(capsys, export, "--socket", str(tmp_path / "no.sock"), "-o", str(gone))
    assert code == export.EXIT_UNAVAILABLE and "no.sock" in err
    assert not gone.exists() and [p.name for p in tmp_path.iterdir() if ".tmp." in p.name] == []


def rewrite_header(path, out, **changes) -> None:
    """A copy of the archive whose header has `changes`, with valid checksums."""
    data = path.read_bytes()
    kind, length = struct.unpack_from("<BI", data, 8)
    header = json.loads(data[13:13 + length])
    header.update(changes)
    body = json.dumps(header).encode()
    head = struct.pack("<BI", kind, len(body))
    out.write_bytes(data[:8] + head + body + struct.pack("<Q", _native.checksum(head, body)) +
                    data[13 + length + 8:])


def test_bad_archives_are_refused_naming_the_problem_and_nothing_is_imported(exported, daemon_factory, tmp_path,
                                                                              capsys):
    _, path = exported
    dst = small(daemon_factory, "secret-b")
    data = path.read_bytes()
    bad = tmp_path / "bad.kvtar"
    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "cut at the end": (data[:-20], "truncated"),
        "flipped byte": (data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:],
                         "checksum mismatch"),
        "not an archive": (b"hello world", "not a kvtier archive"),
    }
    for name, (content, message) in cases.items():
        bad.write_bytes(content)
        code, _, err = run(capsys, import_, str(bad), "--socket", dst.socket)
        assert code == import_.EXIT_REFUSED, name
        assert message in err and "nothing imported" in err, (name, err)
    rewrite_header(path, bad, format_version=2)
    code, _, err = run(capsys, import_, str(bad), "--socket", dst.socket)
    assert code == import_.EXIT_REFUSED and "format version 2" in err
    assert cached(dst, 1) == 0 and cached(dst, 3, "other", "r7") == 0

    # Another layout: the archive of a 3-layer kvtierd into this 2-layer one.
    three = small(daemon_factory, "secret-c", layout={**LAYOUT, "layers": 3})
    with kvtier.Client(three.socket) as c:
        ns = c.open_namespace("m", revision="r1")
        c.save(ns, prompt(1), torch.zeros(6, BLOCK_ELEMS * 3 // 2, dtype=torch.bfloat16))
    three.stop()
    other = tmp_path / "three.kvtar"
    export.export_data_dir(str(three.data_dir), str(other))
    code, _, err = run(capsys, import_, str(other), "--socket", dst.socket)
    assert code == import_.EXIT_REFUSED and "layout" in err
    assert cached(dst, 1) == 0


def test_an_interrupted_export_leaves_no_archive_and_an_interrupted_import_continues(exported, daemon_factory,
                                                                                     tmp_path, capsys):
    src, path = exported
    before = path.read_bytes()

    class Stop(Exception):
        pass

    class StopAfter:
        def __init__(self, n: int) -> None:
            self.n = n

        def update(self, _: int) -> None:
            self.n -= 1
            if self.n == 0:
                raise Stop()

    with pytest.raises(Stop):
        export.export_data_dir(str(src.data_dir), str(path), progress=StopAfter(5))
    assert path.read_bytes() == before  # the archive at that path is untouched
    assert [p.name for p in path.parent.iterdir() if ".tmp." in p.name] == []

    dst = small(daemon_factory, "secret-b")
    with kvtier.Client(dst.socket) as c:
        with pytest.raises(Stop):
            import_.import_archive(c, str(path), progress=StopAfter(4))
    assert cached(dst, 1) == 4  # whole blocks only, the first four of the archive
    code, s, _ = run(capsys, import_, str(path), "--socket", dst.socket, "--json")
    assert (code, s["present"], s["imported"]) == (0, 4, 14)
    assert cached(dst, 1) == 6 and cached(dst, 2) == 6


def test_an_offline_import_into_a_data_dir_is_served_once_kvtierd_starts(exported, daemon_factory, capsys):
    _, path = exported
    dst = small(daemon_factory, "")  # no secret configured: kvtierd made one in data_dir/secret
    dst.stop()
    code, s, err = run(capsys, import_, str(path), "--data-dir", str(dst.data_dir), "--json")
    assert code == import_.EXIT_OK, err
    assert (s["imported"], s["failed"]) == (18, 0)
    dst.start()
    assert cached(dst, 1) == 6 and cached(dst, 3, "other", "r7") == 6
    code, _, err = run(capsys, import_, str(path), "--data-dir", str(dst.data_dir))
    assert code == import_.EXIT_UNAVAILABLE  # a live kvtierd holds it


def test_a_warmed_cache_imported_elsewhere_is_hit_by_an_engine(daemon_factory, tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from kvtier import warm

    src = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="8MiB", secret="host-a",
                         extra={"tiers.nvme_admission_min_uses": 1})
    ids = [7 + (i * 37) % 500 for i in range(70)]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(ids) + "\n")
    assert warm.main(["--model", str(tiny_llama), "--prompts", str(f), "--socket", src.socket, "--quiet"]) == 0
    capsys.readouterr()
    src.stop()
    arch = tmp_path / "warm.kvtar"
    assert export.main(["--data-dir", str(src.data_dir), "-o", str(arch), "--quiet"]) == 0

    dst = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="8MiB", secret="host-b")
    assert import_.main([str(arch), "--socket", dst.socket, "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    with kvtier.Client(dst.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, model, prefill_tokens_per_second=0)
        out, info = kvtier.hf.generate(kv, ns, model, torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert info.restored_tokens == (len(ids) - 1) // 16 * 16
    assert torch.equal(out, ref)
