"""The end-to-end proof: a real HF transformers model restores its KV through a real kvtierd, in
separate processes, and its greedy tokens are those of a full recompute, token for token.

The model is a small Llama with random weights (initializer_range 0.2, so greedy output varies),
made locally; kvtierd runs on a temp data dir with a host tier of 16 blocks (1 MiB), so blocks also reach
NVMe. fp32 (see conftest.tiny_llama); the KV is 4 KiB per token, 64 KiB per block.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import kvtier
import kvtier.hf
from conftest import start_worker

SYSTEM = 150   # system prompt tokens shared by every prompt (9 whole blocks)
NEW = 16       # greedy tokens generated per prompt


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(1024) for _ in range(SYSTEM)]
    return [system + [rng.randrange(1024) for _ in range(rng.randrange(20, 60))] for _ in range(n)]


PROMPTS = prompts(8)


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Full recompute of every prompt, without kvtier: the tokens and first-step logits to match."""
    model = load_model(tiny_llama)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker processes run (OMP_NUM_THREADS=1)
    for p in PROMPTS:
        r = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
        out.append({"sequence": r.sequences[0].tolist(), "logits0": r.logits[0][0].float()})
    torch.set_num_threads(threads)
    generated = [t for r in out for t in r["sequence"][len(PROMPTS[0]) - SYSTEM:]]
    assert len(set(out[0]["sequence"][len(PROMPTS[0]):])) > 3, "greedy output does not vary: a degenerate model"
    assert len(set(generated)) > 20
    return out


def tolerance(logits: torch.Tensor) -> float:
    return 1e-4 * float(logits.abs().max())  # fp32 weights and KV


def assert_same_as_recompute(result: dict, ref: dict) -> None:
    assert result["sequence"] == ref["sequence"], "tokens differ from a full recompute"
    diff = float((result["logits0"] - ref["logits0"]).abs().max())
    assert diff <= tolerance(ref["logits0"]), f"first-step logits differ by {diff}"


def start_prompts(tmp_path: Path, daemon, model: Path, indices: list[int], name: str):
    """A worker process generating PROMPTS[indices] through the daemon; finish() waits for it."""
    pfile, out = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
    pfile.write_text(json.dumps([PROMPTS[i] for i in indices]))
    return start_worker("--socket", daemon.socket, "--model", str(model), "--prompts", str(pfile), "--out", str(out),
                        "--max-new-tokens", str(NEW)), out


def finish(worker) -> list[dict]:
    proc, out = worker
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return torch.load(out)


def run_prompts(tmp_path: Path, daemon, model: Path, indices: list[int], name: str) -> list[dict]:
    return finish(start_prompts(tmp_path, daemon, model, indices, name))


def test_processes_restore_kv_through_kvtierd_and_match_recompute(tmp_path, daemon_factory, tiny_llama, reference):
    # Every demoted block to NVMe (admission off): the restart below restores the whole first prompt,
    # though its tail was used once.
    daemon = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="1MiB",
                            extra={"tiers.nvme_admission_min_uses": 1})

    # Process A prefills two prompts that share the system prompt and saves their KV.
    a = run_prompts(tmp_path, daemon, tiny_llama, [0, 1], "a")
    assert a[0]["restored"] == 0 and a[0]["saved"] == len(PROMPTS[0]) // 16
    for r, i in zip(a, [0, 1]):
        assert_same_as_recompute(r, reference[i])
    assert a[1]["restored"] >= SYSTEM // 16 * 16  # A's second prompt already reuses the first's

    # Process B, another process, restores the longest cached prefix and generates.
    b = run_prompts(tmp_path, daemon, tiny_llama, [2], "b")[0]
    assert b["restored"] >= SYSTEM // 16 * 16
    assert_same_as_recompute(b, reference[2])

    # After a kvtierd restart the blocks come from NVMe (the host tier starts empty).
    daemon.restart()
    b2 = run_prompts(tmp_path, daemon, tiny_llama, [0], "b2")[0]
    assert b2["restored"] == (len(PROMPTS[0]) - 1) // 16 * 16
    assert set(b2["tiers"]) == {"nvme"}
    assert_same_as_recompute(b2, reference[0])

    # Four processes at once on the shared prefix.
    workers = {i: start_prompts(tmp_path, daemon, tiny_llama, [i], f"c{i}") for i in range(4, 8)}
    for i, worker in workers.items():
        r = finish(worker)[0]
        assert r["restored"] >= SYSTEM // 16 * 16, r
        assert_same_as_recompute(r, reference[i])


def test_other_weights_of_the_same_model_id_never_match(tmp_path, daemon_factory, tiny_llama, reference):
    daemon = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="1MiB")
    model = load_model(tiny_llama)
    other_dir = kvtier.hf.random_llama(tmp_path / "retrained", dtype="float32", seed=7)  # same config and id, other weights
    other = load_model(other_dir)
    with kvtier.Client(daemon.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, model, model_id="tiny-llama")
        ns_other = kvtier.hf.open_namespace(kv, other, model_id="tiny-llama")
        assert ns != ns_other
        _, info = kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[0]]), max_new_tokens=1, do_sample=False)
        assert info.saved_blocks > 0
        assert kv.lookup(ns, PROMPTS[0]).block_count == len(PROMPTS[0]) // 16
        assert kv.lookup(ns_other, PROMPTS[0]).block_count == 0
        out, info = kvtier.hf.generate(kv, ns_other, other, torch.tensor([PROMPTS[0]]), max_new_tokens=NEW,
                                       do_sample=False)
        assert info.restored_tokens == 0
        assert out[0].tolist() == other.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW,
                                                 do_sample=False)[0].tolist()


def test_a_tenant_not_bound_to_this_process_is_refused(daemon_factory, tiny_llama):
    daemon = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="1MiB", tenants="""
[[tenant]]
name = "team-a"
salt = "a"
everyone = true
[[tenant]]
name = "team-b"
salt = "b"
uids = [54321]
""")
    model = load_model(tiny_llama)
    with kvtier.Client(daemon.socket) as kv:
        kvtier.hf.open_namespace(kv, model, tenant="team-a")
        with pytest.raises(kvtier.PermissionDenied):
            kvtier.hf.open_namespace(kv, model, tenant="team-b")


def corrupt_nvme_payloads(data_dir: Path, block_bytes: int) -> int:
    """Overwrites bytes in the middle of every slot's payload; slot headers stay intact. A slot is a
    4 KiB header then the payload rounded up to 4 KiB (tiers/nvme_tier.h)."""
    slot = 4096 + (block_bytes + 4095) // 4096 * 4096
    hit = 0
    for f in sorted((data_dir / "nvme").glob("slots.*")):
        with open(f, "r+b") as fh:
            size = os.fstat(fh.fileno()).st_size
            for off in range(0, size - slot + 1, slot):
                fh.seek(off + 4096 + block_bytes // 2)
                fh.write(b"\xA5" * 64)
                hit += 1
    return hit


def test_a_corrupt_nvme_block_is_a_miss_and_the_output_is_unchanged(daemon_factory, tiny_llama, reference):
    daemon = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="1MiB")
    model = load_model(tiny_llama)
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with kvtier.Client(daemon.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, model, model_id="tiny-llama")
        kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[0]]), **kw)
        layout = kv.layout
    daemon.stop()  # flushes every block to NVMe
    assert corrupt_nvme_payloads(daemon.data_dir, layout.bytes_per_block) > 0
    daemon.start()
    with kvtier.Client(daemon.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, model, model_id="tiny-llama")
        out, info = kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[3]]), **kw)
        assert info.restored_tokens == 0 and "checksum" in (info.error or ""), info
        assert_same_as_recompute({"sequence": out.sequences[0].tolist(), "logits0": out.logits[0][0].float()},
                                 reference[3])
        # The failed blocks are misses from then on; the recompute saved them again (a repair).
        out, info = kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[5]]), **kw)
        assert info.restored_tokens >= SYSTEM // 16 * 16 and info.error is None, info
        assert_same_as_recompute({"sequence": out.sequences[0].tolist(), "logits0": out.logits[0][0].float()},
                                 reference[5])


def test_a_daemon_that_dies_mid_restore_costs_a_recompute_not_the_request(daemon_factory, tiny_llama, reference):
    daemon = daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="1MiB")
    model = load_model(tiny_llama)
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    kv = kvtier.Client(daemon.socket)
    ns = kvtier.hf.open_namespace(kv, model, model_id="tiny-llama")
    kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[0]]), **kw)
    assert kv.lookup(ns, PROMPTS[1]).block_count >= SYSTEM // 16

    # The daemon is SIGKILLed after the lookup leased the prefix and before the load reaches it.
    real_load = kv.load

    def load_after_the_daemon_died(match, dst, layers=None):
        daemon.kill()
        return real_load(match, dst, layers)

    kv.load = load_after_the_daemon_died
    out, info = kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[1]]), **kw)
    assert info.restored_tokens == 0 and info.saved_blocks == 0 and info.error, info
    assert_same_as_recompute({"sequence": out.sequences[0].tolist(), "logits0": out.logits[0][0].float()},
                             reference[1])
    # With the daemon gone, the next request finds nothing and still answers (lookup fails: a miss).
    kv.load = real_load
    out, info = kvtier.hf.generate(kv, ns, model, torch.tensor([PROMPTS[2]]), **kw)
    assert info.restored_tokens == 0 and info.error
    assert out.sequences[0].tolist() == reference[2]["sequence"]
    kv.close()
