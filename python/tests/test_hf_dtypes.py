"""kvtier.hf in one process on the in-process Store: every dtype and GQA/MQA shape round-trips the
cache's bytes exactly, and generation from the restored prefix equals a full recompute."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvtier
import kvtier.hf

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def model_of(dtype: torch.dtype, kv_heads: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_restored_cache_is_the_saved_cache_and_generation_matches(dtype, kv_heads, device):
    model = model_of(dtype, kv_heads, device)
    layout = kvtier.hf.layout_for(model)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (3, kv_heads, 32)
    assert layout.dtype == {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    with kvtier.Store(layout, "8MiB") as kv:
        ns = kvtier.hf.open_namespace(kv, model, model_id="tiny")
        g = torch.Generator().manual_seed(3)
        system = torch.randint(0, 512, (1, 100), generator=g)
        first = torch.cat([system, torch.randint(0, 512, (1, 30), generator=g)], 1).to(device)
        second = torch.cat([system, torch.randint(0, 512, (1, 21), generator=g)], 1).to(device)

        with torch.no_grad():
            prefill = model(first, use_cache=True).past_key_values
        assert kvtier.hf.save_cache(kv, ns, first[0], prefill) == 130 // 16

        restored = kvtier.hf.restore_cache(kv, ns, second[0], model.config, device=device, dtype=dtype)
        assert restored.tokens == 96  # the system prompt's 6 whole blocks
        for layer in range(3):
            for got, want in ((restored.cache.layers[layer].keys, prefill.layers[layer].keys),
                              (restored.cache.layers[layer].values, prefill.layers[layer].values)):
                assert got.device.type == device and got.dtype == dtype
                assert torch.equal(got, want[:, :, :96])  # exact bytes, not just close

        kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
        out, info = kvtier.hf.generate(kv, ns, model, second, **kw)
        ref = model.generate(second, **kw)
        assert info.restored_tokens == 96 and info.saved_blocks == 121 // 16 - 6
        assert out.sequences.tolist() == ref.sequences.tolist()
        tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
        scale = float(ref.logits[0].float().abs().max())
        assert float((out.logits[0].float() - ref.logits[0].float()).abs().max()) <= tol * scale


def test_a_whole_prompt_cached_still_leaves_a_token_to_compute():
    model = model_of(torch.float32, 2, "cpu")
    with kvtier.Store(kvtier.hf.layout_for(model), "8MiB") as kv:
        ns = kvtier.hf.open_namespace(kv, model, model_id="tiny")
        prompt = torch.randint(0, 512, (1, 64))  # exactly 4 blocks
        kvtier.hf.generate(kv, ns, model, prompt, max_new_tokens=1, do_sample=False)
        assert kv.lookup(ns, prompt[0]).block_count == 4
        out, info = kvtier.hf.generate(kv, ns, model, prompt, max_new_tokens=8, do_sample=False)
        assert info.restored_tokens == 48  # 3 blocks: the last block holds the token to compute
        assert out.tolist() == model.generate(prompt, max_new_tokens=8, do_sample=False).tolist()


def test_a_model_of_another_layout_is_refused():
    model = model_of(torch.float32, 2, "cpu")
    with kvtier.Store(kvtier.KvLayout.standard(3, 2, 32, "bf16"), "8MiB") as kv:
        with pytest.raises(kvtier.LayoutMismatch, match="fp32"):
            kvtier.hf.open_namespace(kv, model)


def test_the_revision_is_a_digest_of_the_weights(tmp_path):
    a, b = model_of(torch.float32, 2, "cpu", seed=0), model_of(torch.float32, 2, "cpu", seed=1)
    assert kvtier.hf.weights_revision(a) == kvtier.hf.weights_revision(model_of(torch.float32, 2, "cpu", seed=0))
    assert kvtier.hf.weights_revision(a) != kvtier.hf.weights_revision(b)
    a.save_pretrained(tmp_path / "a")
    assert kvtier.hf.weights_revision(tmp_path / "a").startswith("sha256:")
    with pytest.raises(kvtier.InvalidArgument, match="no weight files"):
        kvtier.hf.weights_revision(tmp_path / "nothing-here")


def test_generate_times_its_prefill_and_recomputes_what_restores_slower():
    hf = kvtier.hf
    model = model_of(torch.float32, 2, "cpu")
    layout = hf.layout_for(model)
    with kvtier.Store(layout, "64MiB") as kv:
        ns = hf.open_namespace(kv, model, model_id="tiny")
        ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(5))
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
        out, first = hf.generate(kv, ns, model, ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, ref)
        assert first.restored_tokens == 0 and first.prefill_seconds > 0
        meter = hf._meter(kv, ns)
        assert meter is not None and meter.speed.declared == meter.speed.measured > 0  # declared to the store
        # An engine declared faster than any restore recomputes the cached prefix, and its output
        # is unchanged; the match says what it held back.
        fast = hf.open_namespace(kv, model, model_id="tiny", prefill_tokens_per_second=1e15)
        assert fast == ns and hf._meter(kv, ns) is None
        out, info = hf.generate(kv, ns, model, ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, ref)
        assert info.restored_tokens == 0 and info.held_back_blocks == 4
        # A slow one restores it all.
        hf.open_namespace(kv, model, model_id="tiny", prefill_tokens_per_second=1.0)
        out, info = hf.generate(kv, ns, model, ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, ref)
        assert info.restored_tokens == 64 and info.held_back_blocks == 0
