#!/usr/bin/env python3
"""Compares kvtier's GPU attention outputs with torch SDPA on the gathered, contiguous K/V that
kernels_gpu_check --dump DIR wrote, then times SDPA on the benchmark shapes of bench_decode.tsv
and prints "ours vs SDPA". Optional: exits 0 with a note when torch or a GPU is missing.

usage: torch_sdpa_check.py DIR
"""
import math
import os
import sys


def main() -> int:
    d = sys.argv[1]
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch not importable: PyTorch comparison skipped (pip install torch to enable)")
        return 0
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: PyTorch comparison skipped")
        return 0
    dev = "cuda"
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}

    def load(name, dtype, shape):
        with open(os.path.join(d, name), "rb") as f:
            raw = bytearray(f.read())
        return torch.frombuffer(raw, dtype=torch.int16).view(dtype).reshape(shape).to(dev)

    def sdpa(q, k, v, mask=None):
        # q [B,H,Lq,D], k/v [B,KH,Lk,D]; repeat kv heads for GQA (works on every torch 2.x)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    failures = 0
    print("correctness, ours vs torch SDPA on gathered contiguous K/V:")
    for meta_name in sorted(n for n in os.listdir(d) if n.endswith(".meta")):
        base = meta_name[:-5]
        meta = dict(line.split("=", 1) for line in open(os.path.join(d, meta_name)).read().split())
        t = dt[meta["dtype"]]
        H, KH, D = int(meta["H"]), int(meta["KH"]), int(meta["D"])
        if meta["kind"] == "decode":
            S, L = int(meta["S"]), int(meta["len"])
            q = load(base + ".q", t, (S, H, 1, D))
            k = load(base + ".k", t, (S, L, KH, D)).permute(0, 2, 1, 3)
            v = load(base + ".v", t, (S, L, KH, D)).permute(0, 2, 1, 3)
            ours = load(base + ".out", t, (S, H, 1, D))
            ref = sdpa(q.float(), k.float(), v.float())
        else:
            P, N = int(meta["prefix"]), int(meta["new"])
            q = load(base + ".q", t, (N, H, D)).permute(1, 0, 2).unsqueeze(0)
            k = load(base + ".k", t, (P + N, KH, D)).permute(1, 0, 2).unsqueeze(0)
            v = load(base + ".v", t, (P + N, KH, D)).permute(1, 0, 2).unsqueeze(0)
            ours = load(base + ".out", t, (N, H, D)).permute(1, 0, 2).unsqueeze(0)
            i = torch.arange(N, device=dev).unsqueeze(1)
            j = torch.arange(P + N, device=dev).unsqueeze(0)
            ref = sdpa(q.float(), k.float(), v.float(), mask=(j <= P + i))
        err = (ours.float() - ref).abs()
        # one ulp of the output dtype relative, plus 1e-4 of max |V|, as the C++ tests state
        ulp = 2.0 ** (-10 if meta["dtype"] == "fp16" else -7)
        tol = ulp * ref.abs() + 1e-4 * v.float().abs().max()
        ok = bool((err <= 2 * tol).all()) and not bool(torch.isnan(ours.float()).any())
        failures += not ok
        print(f"  [{' ok ' if ok else 'FAIL'}] {base:<40} max abs err {err.max().item():.2e}")

    rows = []
    tsv = os.path.join(d, "bench_decode.tsv")
    if os.path.exists(tsv):
        for line in open(tsv):
            what, S, H, KH, D, L, kvd, ours_ms = line.rstrip("\n").split("\t")
            S, H, KH, D, L = map(int, (S, H, KH, D, L))
            q = torch.randn(S, H, 1, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(S, KH, L, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(S, KH, L, D, device=dev, dtype=torch.bfloat16)
            try:  # torch >= 2.5 reads GQA K/V without copies
                fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                fn()
            except TypeError:
                kr, vr = k.repeat_interleave(H // KH, 1), v.repeat_interleave(H // KH, 1)
                fn = lambda: F.scaled_dot_product_attention(q, kr, vr)
            fn()
            times = []
            batch = 20  # back-to-back calls per sample, as kernels_gpu_check times ours
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(batch):
                    fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / batch)
            sdpa_ms = sorted(times)[len(times) // 2]
            rows.append((what, float(ours_ms), sdpa_ms, kvd))
            del q, k, v
            torch.cuda.empty_cache()
    with open(os.path.join(d, "torch_table.txt"), "w") as out:
        out.write(f"decode time vs torch {torch.__version__} SDPA (contiguous bf16 K/V; ours reads paged blocks):\n")
        out.write(f"  {'what':<58} {'ours ms':>9} {'sdpa ms':>9} {'speedup':>8}\n")
        for what, ours_ms, sdpa_ms, kvd in rows:
            out.write(f"  {what:<58} {ours_ms:9.3f} {sdpa_ms:9.3f} {sdpa_ms / ours_ms:7.2f}x\n")
    print(f"{failures} torch comparison(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
