"""Prefill throughput of `AutoRegressiveLM` against transformers' Llama on the same weights.

A ~50M-parameter Llama-like model (dim 512, 8 layers, 8 query / 4 KV heads, SwiGLU 1536, vocab 32000) runs
one full forward over a batch of 4 x 256 tokens, in float32 and bfloat16. For each we report tokens/s for
both models, and our achieved FLOP/s as a share of the measured matmul peak (a large `torch.matmul` in the
same dtype), the physical bound for a prefill: forward FLOPs per token = 2 x (non-embedding parameters,
LM head included) + 4 x n_layers x seq_len x dim (attention scores and values, torchtitan's convention).

    python benchmarks/bench_prefill.py [--quick] [--device cuda] [--batch 4] [--seq 256] [--reps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from astrai.model import AutoModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fns: list, device: torch.device, reps: int) -> list[float]:
    """Best of `reps` timed calls of each function after one warm-up call each. The functions take turns,
    so a noisy neighbour on a shared machine slows both alike and the minimum filters it out."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """FLOP/s of an n x n x n matmul (n = 2048 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call([lambda: a @ b], device, reps)[0]


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    cfg = model.config
    non_embedding = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    return 2 * non_embedding + 4 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed rep, fp32 only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = 1 if args.quick else args.reps
    dtypes = ["fp32"] if args.quick else list(DTYPES)

    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config()).eval()
    hf_model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        ours = AutoModel.from_pretrained(folder)  # the very same weights
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq
    flops = flops_per_token(ours, args.seq)

    rows, lines = [], []
    for name in dtypes:
        dtype = DTYPES[name]
        hf_model.to(device=device, dtype=dtype)
        ours.to(device=device, dtype=dtype)
        with torch.inference_mode():
            t_ours, t_hf = seconds_per_call([lambda: ours(ids), lambda: hf_model(ids)], device, reps)
        peak = matmul_peak(dtype, device, reps)
        ours_tps, hf_tps = tokens / t_ours, tokens / t_hf
        share = ours_tps * flops / peak
        lines.append(
            f"{name:5} {ours_tps:12,.0f} {hf_tps:12,.0f} {ours_tps / hf_tps:8.2f}x {peak / 1e9:10,.1f} {share:8.1%}"
        )
        rows.append(
            dict(
                metric=f"prefill {args.batch}x{args.seq} {name} ({device.type})",
                unit="tok/s",
                ours=ours_tps,
                peer=hf_tps,
                peer_name="transformers LlamaForCausalLM",
                limit=peak / flops,
                limit_name="matmul-peak bound",
            )
        )
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"prefill, {params:.0f}M-param Llama-like model, batch {args.batch} x {args.seq} tokens, {device}")
    print(f"{'dtype':5} {'ours tok/s':>12} {'HF tok/s':>12} {'ours/HF':>9} {'peak GF/s':>10} {'of peak':>8}")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
