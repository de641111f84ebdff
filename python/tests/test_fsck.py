"""kvtier fsck on a real kvtierd's data dir: clean after a graceful stop, refused while kvtierd runs,
a rotted payload byte found and repaired, and the repaired dir served by kvtierd again with every
remaining block byte-identical."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import kvtier
from kvtier import fsck

from conftest import BUILD

LAYOUT = {"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16", "block_tokens": 4}
BLOCK_ELEMS = 2 * 2 * 4 * 2 * 8  # layers × K|V × tokens × heads × dim


def prompt(i: int) -> list[int]:
    return [1000 * i + t for t in range(24)]  # 6 blocks, nothing shared between prompts


def kv_of(i: int) -> torch.Tensor:
    return torch.randn(6, BLOCK_ELEMS, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = fsck.main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and out.strip() else None), err


@pytest.fixture
def stopped(daemon_factory):
    d = daemon_factory(layout=LAYOUT, host_bytes="1MiB", nvme_bytes="4MiB",
                       extra={"tiers.nvme_admission_min_uses": 1})
    with kvtier.Client(d.socket) as c:
        ns = c.open_namespace("fsck-model")
        for i in range(3):
            assert c.save(ns, prompt(i), kv_of(i)) == 6
    d.stop()  # a graceful stop writes every block back to NVMe
    return d


def test_a_clean_data_dir_checks_clean_and_a_live_one_is_refused(stopped, capsys):
    code, r, _ = run(capsys, str(stopped.data_dir), "--json")
    assert code == fsck.EXIT_OK
    assert r["errors"] == 0
    assert r["good_blocks"] == 18
    assert r["bytes_read"] >= 18 * 2 * BLOCK_ELEMS  # every payload read, not just headers
    assert r["dir"] == str(stopped.data_dir / "nvme")

    # Through the kvtier command, which hands fsck to this package.
    p = subprocess.run([str(BUILD / "tools" / "kvtier"), "fsck", str(stopped.data_dir)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "18 good blocks" in p.stdout
    assert "nothing wrong" in p.stdout

    stopped.start()
    code, _, err = run(capsys, str(stopped.data_dir))
    assert code == fsck.EXIT_OPERATIONAL
    assert "LOCK" in err and "unavailable" in err

    code, _, err = run(capsys, str(stopped.data_dir / "no-such"))
    assert code == fsck.EXIT_OPERATIONAL
    assert "no such directory" in err


def test_a_rotted_payload_is_found_repaired_and_the_rest_still_served(stopped, capsys):
    nvme = stopped.data_dir / "nvme"
    code, r, _ = run(capsys, str(stopped.data_dir), "--json")
    slot_bytes = r["slot_bytes"]
    # Slot 0 holds some block; one byte in the middle of its payload rots (the header stays valid,
    # so a restart alone would not notice).
    with open(nvme / "slots.0", "r+b") as f:
        f.seek(4096 + 100)
        b = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    assert slot_bytes > 4096 + 100

    code, r, _ = run(capsys, str(stopped.data_dir), "--json")
    assert code == fsck.EXIT_ERRORS_LEFT
    assert r["bad_slots"] == 1
    bad = [p for p in r["problems"] if p["kind"] == "bad_slot"]
    assert len(bad) == 1 and bad[0]["slot"] == 0 and "checksum" in bad[0]["detail"]
    lost = 1 + r["broken_chains"]  # the bad block and the rest of its prompt
    assert r["good_blocks"] == 18 - lost

    code, fixed, _ = run(capsys, str(stopped.data_dir), "--repair", "--json")
    assert code == fsck.EXIT_REPAIRED
    assert all(p["repaired"] for p in fixed["problems"])
    code, clean, _ = run(capsys, str(stopped.data_dir), "--json")
    assert code == fsck.EXIT_OK
    assert (clean["errors"], clean["slots_without_entry"], clean["good_blocks"]) == (0, 0, 18 - lost)

    stopped.start()
    hits = 0
    with kvtier.Client(stopped.socket) as c:
        ns = c.open_namespace("fsck-model")
        for i in range(3):
            with c.lookup(ns, prompt(i)) as m:
                hits += m.block_count
                if m.block_count:
                    out = torch.zeros(m.block_count, BLOCK_ELEMS, dtype=torch.bfloat16)
                    c.load(m, out).wait()
                    assert torch.equal(out, kv_of(i)[: m.block_count])
    assert hits == 18 - lost
