"""kvtier warm: prompts computed ahead of traffic into a real kvtierd, resumable, with bad input
refused before anything is stored; an engine then hits the warmed KV with output identical to a
recompute."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import kvtier
import kvtier.hf
from kvtier import warm

from conftest import BUILD

SYSTEM = [7 + (i * 37) % 500 for i in range(64)]  # 4 blocks shared by every prompt


def prompt(i: int, extra: int) -> list[int]:
    return SYSTEM + [(i * 101 + j * 13) % 500 + 1 for j in range(extra)]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = warm.main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args and out.strip() else None), err


@pytest.fixture
def daemon(daemon_factory, tiny_llama):
    return daemon_factory(hf_config=tiny_llama / "config.json", host_bytes="8MiB")


def test_warm_saves_every_prompt_once_and_an_engine_then_hits_it(daemon, tiny_llama, tmp_path, capsys):
    prompts = [prompt(1, 40), prompt(2, 23), prompt(3, 70)]
    f = write_jsonl(tmp_path / "p.jsonl", [prompts[0], {"tokens": prompts[1]}, "", {"tokens": prompts[2]}])
    code, s, _ = run(capsys, "--model", str(tiny_llama), "--prompts", str(f), "--socket", daemon.socket, "--json")
    assert code == 0
    assert (s["prompts"], s["warmed"], s["cached"], s["failed"]) == (3, 3, 0, 0)
    blocks = [len(p) // 16 for p in prompts]
    # The shared system prompt's 4 blocks are saved once: the later prompts restore them.
    assert s["blocks_saved"] == sum(blocks) - 2 * 4
    assert s["restored_tokens"] >= 2 * 4 * 16
    assert s["blocks_per_tier"] == {"host": sum(blocks)}

    # A rerun finds everything cached and computes nothing.
    code, again, _ = run(capsys, "--model", str(tiny_llama), "--prompts", str(f), "--socket", daemon.socket, "--json")
    assert code == 0
    assert (again["warmed"], again["cached"], again["blocks_saved"], again["computed_tokens"]) == (0, 3, 0, 0)

    # An engine hits the warmed KV, and its output is a recompute's.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([prompts[2]])
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    with kvtier.Client(daemon.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, model, prefill_tokens_per_second=0)
        out, info = kvtier.hf.generate(kv, ns, model, ids, max_new_tokens=6, do_sample=False)
    assert info.restored_tokens == (len(prompts[2]) - 1) // 16 * 16
    assert torch.equal(out, ref)


def test_an_interrupted_warm_continues_where_it_stopped(daemon, tiny_llama, tmp_path, capsys):
    first, second = prompt(4, 48), prompt(5, 90)
    part = write_jsonl(tmp_path / "part.jsonl", [first])
    code, s, _ = run(capsys, "--model", str(tiny_llama), "--prompts", str(part), "--socket", daemon.socket, "--json")
    assert code == 0 and s["warmed"] == 1
    # The whole list: the first prompt is skipped, the second computes only what it lacks.
    whole = write_jsonl(tmp_path / "whole.jsonl", [first, second])
    code, s, _ = run(capsys, "--model", str(tiny_llama), "--prompts", str(whole), "--socket", daemon.socket, "--json")
    assert code == 0
    assert (s["cached"], s["warmed"]) == (1, 1)
    assert s["computed_tokens"] == len(second) - 4 * 16  # the shared system prompt was restored
    # The human summary names the counts.
    code, _, _ = run(capsys, "--model", str(tiny_llama), "--prompts", str(whole), "--socket", daemon.socket)
    assert code == 0


def test_bad_input_is_refused_naming_the_line_and_nothing_is_stored(daemon, tiny_llama, tmp_path, capsys):
    good = prompt(6, 40)
    cases = {
        "not json": (["[1, 2", good], "bad.jsonl:1: not JSON"),
        "negative id": ([good, [1, -2, 3]], "bad.jsonl:2: a prompt is a list of token ids"),
        "not a list": ([{"tokens": "1 2 3"}], "bad.jsonl:1"),
        "text, no tokenizer": ([{"text": "hello"}], "bad.jsonl:1: a text prompt needs a tokenizer"),
    }
    for name, (lines, message) in cases.items():
        f = write_jsonl(tmp_path / "bad.jsonl", lines)
        code, _, err = run(capsys, "--model", str(tiny_llama), "--prompts", str(f), "--socket", daemon.socket)
        assert code == warm.EXIT_USAGE, name
        assert message in err, (name, err)
    code, _, err = run(capsys, "--model", str(tiny_llama), "--prompts", str(tmp_path / "missing.jsonl"),
                       "--socket", daemon.socket)
    assert code == warm.EXIT_USAGE and "missing.jsonl" in err
    with kvtier.Client(daemon.socket) as kv:  # nothing was saved by any of them
        assert kv.metrics().get("kvtier_saved_blocks_total", 0) == 0
    # A kvtierd that is not there is its own exit status.
    f = write_jsonl(tmp_path / "ok.jsonl", [good])
    code, _, err = run(capsys, "--model", str(tiny_llama), "--prompts", str(f), "--socket", str(tmp_path / "no.sock"))
    assert code == warm.EXIT_UNAVAILABLE and "cannot be reached" in err


def test_the_kvtier_command_runs_warm(daemon, tiny_llama, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [prompt(7, 30)])
    env = dict(os.environ, KVTIER_PYTHON=os.environ.get("KVTIER_PYTHON", __import__("sys").executable))
    env["PYTHONPATH"] = str(Path(kvtier.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([str(BUILD / "tools" / "kvtier"), "warm", "--model", str(tiny_llama), "--prompts", str(f),
                        "--socket", daemon.socket, "--json", "--quiet"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["warmed"] == 1
    usage = subprocess.run([str(BUILD / "tools" / "kvtier"), "warm", "--help"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0 and "--prompts" in usage.stdout
