"""One engine process: a HF transformers model generating through kvtierd (kvtier.hf.generate).

Reads prompts (token id lists) from a JSON file, generates greedily with kvtier restoring each
prompt's cached prefix and saving its new blocks, and writes the tokens, the first step's logits
and what was restored to a torch file. Used by test_hf_e2e.py as "process A/B".
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM

import kvtier
import kvtier.hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tenant", default="")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    prompts = json.load(open(args.prompts))
    results = []
    with kvtier.Client(args.socket) as kv:
        ns = kvtier.hf.open_namespace(kv, model, tenant=args.tenant, model_id="tiny-llama")
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out, info = kvtier.hf.generate(kv, ns, model, ids, save=not args.no_save, max_new_tokens=args.max_new_tokens,
                                           do_sample=False, return_dict_in_generate=True, output_logits=True)
            results.append({"sequence": out.sequences[0].tolist(), "logits0": out.logits[0][0].float(),
                            "restored": info.restored_tokens, "saved": info.saved_blocks, "tiers": info.tiers,
                            "error": info.error})
    torch.save(results, args.out)


if __name__ == "__main__":
    main()
