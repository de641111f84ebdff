"""kvtier inspect, doctor and prefetch against a real kvtierd: what is cached per namespace and the
most reused prefixes; the cause of each planted miss (a tail, another tenant or revision, a block
size kvtierd does not have, eviction from host); warmed NVMe blocks promoted to host before a peak.
Through the kvtier command too, and with bad input refused."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import kvtier
from kvtier import doctor, inspect, prefetch

from conftest import BUILD

LAYOUT = {"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4}
BLOCK_ELEMS = 2 * 2 * 4 * 2 * 8
TENANTS = """
[[tenant]]
name = "team-a"
salt = "a"
everyone = true
[[tenant]]
name = "team-b"
salt = "b"
everyone = true
"""


def prompt(i: int, blocks: int = 6) -> list[int]:
    return [1000 * i + t for t in range(4 * blocks)]


def kv_of(i: int, blocks: int = 6) -> torch.Tensor:
    return torch.randn(blocks, BLOCK_ELEMS, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def run(capsys, tool, *args: str) -> tuple[int, dict | None, str, str]:
    code = tool.main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and out.strip() else None), out, err


def tokens_arg(t: list[int]) -> str:
    return ",".join(map(str, t))


def test_inspect_and_doctor_explain_what_is_cached_and_why_a_prompt_misses(daemon_factory, capsys):
    d = daemon_factory(layout=LAYOUT, host_bytes="1MiB", nvme_bytes="4MiB", tenants=TENANTS)
    sock = d.socket
    with kvtier.Client(sock) as c:
        ns = c.open_namespace("model-x", tenant="team-a", revision="r1")
        assert c.save(ns, prompt(1), kv_of(1)) == 6
        for _ in range(2):
            with c.lookup(ns, prompt(1)) as m:
                assert m.block_count == 6

    code, r, _, _ = run(capsys, inspect, "--socket", sock, "--json", "--top", "3")
    assert code == inspect.EXIT_OK
    assert r["source"] == "kvtierd"
    [n] = [n for n in r["namespaces"] if n["blocks"]]
    assert (n["model"], n["tenant"], n["revision"], n["blocks"]) == ("model-x", "team-a", "r1", 6)
    assert n["resident_blocks"]["host"] == 6 and n["hits"] == 12
    top = r["most_reused"][0]
    assert (top["blocks"], top["hits"], top["tokens_restored"]) == (6, 2, 2 * 24)
    assert top["last_tokens"] == prompt(1)[-4:]

    base = ["--socket", sock, "--model-id", "model-x", "--revision", "r1", "--tenant", "team-a", "--json"]
    code, r, _, _ = run(capsys, doctor, *base, "--tokens", tokens_arg(prompt(1) + [7, 7, 7]))
    assert code == doctor.EXIT_OK
    [p] = r["prompts"]
    assert (p["cause"], p["hit_blocks"], p["tail_tokens"]) == ("all_cached", 6, 3)

    other = [a if a != "team-a" else "team-b" for a in base]
    code, r, _, _ = run(capsys, doctor, *other, "--tokens", tokens_arg(prompt(1)))
    assert code == doctor.EXIT_MISSES
    [p] = r["prompts"]
    assert p["cause"] == "other_tenant" and p["would_hit_blocks"] == 6
    assert p["alternatives"][0]["tenant"] == "team-a"

    revised = [a if a != "r1" else "r2" for a in base]
    code, r, _, _ = run(capsys, doctor, *revised, "--tokens", tokens_arg(prompt(1)))
    assert r["prompts"][0]["cause"] == "other_revision"

    code, r, _, _ = run(capsys, doctor, *base, "--block-tokens", "6", "--tokens", tokens_arg(prompt(1)))
    assert r["prompts"][0]["cause"] == "block_size"

    # The human report, through the kvtier command.
    p = subprocess.run([str(BUILD / "tools" / "kvtier"), "doctor", *base[:-1], "--tokens", tokens_arg(prompt(2))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == doctor.EXIT_MISSES, p.stderr
    assert "never_saved" in p.stdout and "cached: 0 of 6 blocks" in p.stdout
    p = subprocess.run([str(BUILD / "tools" / "kvtier"), "inspect", "--socket", sock], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "model 'model-x' tenant 'team-a'" in p.stdout and "most reused prefixes" in p.stdout

    # Bad input: no namespace named, a prompt that is not token ids, an unknown tenant.
    code, _, _, err = run(capsys, doctor, "--socket", sock, "--tokens", "1,2,3")
    assert code == doctor.EXIT_USAGE and "--model" in err
    code, _, _, err = run(capsys, doctor, "--socket", sock, "--model-id", "m", "--tokens", "1,x")
    assert code == doctor.EXIT_USAGE
    code, _, _, err = run(capsys, doctor, "--socket", sock, "--model-id", "m", "--tenant", "nobody", "--tokens", "1")
    assert code == doctor.EXIT_USAGE and "nobody" in err

    # After a restart the namespace's record names no tenant (team-a has no tier share): its root,
    # rebuilt from the config's salts, names it again.
    d.restart()
    code, r, _, _ = run(capsys, inspect, "--socket", sock, "--json")
    [n] = [n for n in r["namespaces"] if n["blocks"]]
    assert (n["tenant"], n["blocks"], n["resident_blocks"]["nvme"]) == ("team-a", 6, 6)

    # The data dir is the live daemon's: refused, then read once it stopped.
    code, _, _, err = run(capsys, inspect, "--data-dir", str(d.data_dir))
    assert code == inspect.EXIT_UNAVAILABLE and "LOCK" in err
    d.stop()
    code, r, _, _ = run(capsys, inspect, "--data-dir", str(d.data_dir), "--json")
    assert code == inspect.EXIT_OK
    assert r["source"] == "data_dir"
    code, _, _, err = run(capsys, inspect, "--socket", sock)
    assert code == inspect.EXIT_UNAVAILABLE


def test_doctor_names_a_prompt_evicted_from_host(daemon_factory, capsys):
    # 32 blocks of host and the default NVMe admission (a block used once is not written to NVMe):
    # the first prompt is evicted from host for good by the ones saved after it.
    d = daemon_factory(layout=LAYOUT, host_bytes="16KiB", nvme_bytes="4MiB")
    with kvtier.Client(d.socket) as c:
        ns = c.open_namespace("model-x")
        for i in range(1, 11):
            assert c.save(ns, prompt(i), kv_of(i)) == 6
    code, r, _, _ = run(capsys, doctor, "--socket", d.socket, "--model-id", "model-x", "--json",
                        "--tokens", tokens_arg(prompt(1)))
    assert code == doctor.EXIT_MISSES
    [p] = r["prompts"]
    assert p["cause"] == "evicted", p
    assert p["evicted"]["tier"] == "host"
    assert "never written to NVMe" in p["explanation"]


def test_prefetch_promotes_warmed_prefixes_from_nvme_to_host(daemon_factory, tmp_path, capsys):
    d = daemon_factory(layout=LAYOUT, host_bytes="1MiB", nvme_bytes="4MiB", extra={"tiers.nvme_admission_min_uses": 1})
    with kvtier.Client(d.socket) as c:
        ns = c.open_namespace("model-x", revision="r1")
        for i in (1, 2):
            assert c.save(ns, prompt(i), kv_of(i)) == 6
    d.restart()  # a graceful stop writes the blocks to NVMe; after the restart they are there only
    f = tmp_path / "peak.jsonl"
    f.write_text(json.dumps(prompt(1)) + "\n" + json.dumps({"tokens": prompt(2)}) + "\n" + json.dumps(prompt(3)) + "\n")
    args = ["--socket", d.socket, "--model-id", "model-x", "--revision", "r1", "--prompts", str(f), "--to", "host"]
    code, s, _, _ = run(capsys, prefetch, *args, "--json")
    assert code == prefetch.EXIT_OK
    assert (s["prompts"], s["cached_blocks"], s["moved_blocks"], s["uncached_prompts"]) == (3, 12, 12, 1)
    assert s["blocks_per_tier"] == {"host": 12}
    code, s, _, _ = run(capsys, prefetch, *args, "--json")
    assert s["moved_blocks"] == 0  # there already
    with kvtier.Client(d.socket) as c:  # and the promoted bytes are the saved ones
        ns = c.open_namespace("model-x", revision="r1")
        with c.lookup(ns, prompt(2)) as m:
            out = torch.zeros(6, BLOCK_ELEMS, dtype=torch.bfloat16)
            c.load(m, out).wait()
            assert torch.equal(out, kv_of(2))

    code, _, _, err = run(capsys, prefetch, *args[:-4], "--prompts", str(tmp_path / "none.jsonl"), "--to", "host")
    assert code == prefetch.EXIT_USAGE and "none.jsonl" in err
    with pytest.raises(SystemExit):  # argparse: --to must be host or hbm
        prefetch.main([*args[:-1], "nvme"])
