"""Prefill throughput of `AutoRegressiveLM` against transformers' Llama on the same weights.

A ~50M-parameter Llama-like model (dim 512, 8 layers, 8 query / 4 KV heads, SwiGLU 1536, vocab 32000) runs
one full forward over a batch of 4 x 256 tokens (`--quick`: 1 x 128, one timed rep), in float32 and bfloat16.
For each we report tokens/s for both models, and the limit: the measured matmul peak (a large `torch.matmul`
in the same dtype) divided by the forward FLOPs per token = 2 x (non-embedding parameters, LM head included)
+ 4 x n_layers x seq_len x dim (attention scores and values, torchtitan's convention).

    python benchmarks/bench_prefill.py [--quick] [--device cuda] [--batch 4] [--seq 256] [--reps 4]
    astrai bench prefill [--quick]          # the same rows in the combined table
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

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
    """Best of `reps` timed calls of each function after two warm-up calls each (on CPU, bf16 kernels take
    more than one call to settle). The functions take turns, so a noisy neighbour on a shared machine slows
    them alike and the minimum filters it out."""
    for fn in fns:
        fn()
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


def square_matmul(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], torch.Tensor], float]:
    """An n x n x n matmul (n = 2048 on CPU, 8192 on GPU) and its FLOPs: the machine's matmul peak, timed."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b, 2.0 * n**3


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    cfg = model.config
    non_embedding = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    return 2 * non_embedding + 4 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the prefill table; return one `astrai bench` row per dtype."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 x 128, one timed rep (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per forward (default 4, quick 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256, quick 128)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls, the best counts (default 4, quick 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (1 if args.quick else 4)
    seq = args.seq or (128 if args.quick else 256)
    reps = args.reps or (1 if args.quick else 4)

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would clutter the table
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config()).eval()
    hf_model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        ours = AutoModel.from_pretrained(folder)  # the very same weights
    ids = torch.randint(0, 32000, (batch, seq), device=device)
    tokens = batch * seq
    flops = flops_per_token(ours, seq)

    rows, lines = [], []
    for name in DTYPES:
        dtype = DTYPES[name]
        hf_model.to(device=device, dtype=dtype)
        ours.to(device=device, dtype=dtype)
        matmul, matmul_flops = square_matmul(dtype, device)
        with torch.inference_mode():  # the peak takes turns with the models: the same neighbours slow all three
            t_ours, t_hf, t_matmul = seconds_per_call([lambda: ours(ids), lambda: hf_model(ids), matmul], device, reps)
        peak = matmul_flops / t_matmul
        ours_tps, hf_tps = tokens / t_ours, tokens / t_hf
        share = ours_tps * flops / peak
        lines.append(
            f"{name:5} {ours_tps:12,.0f} {hf_tps:12,.0f} {ours_tps / hf_tps:8.2f}x {peak / 1e9:10,.1f} {share:8.1%}"
        )
        rows.append(
            dict(
                metric=f"prefill {batch}x{seq} {name} ({device.type})",
                unit="tok/s",
                ours=ours_tps,
                peer=hf_tps,
                peer_name="transformers LlamaForCausalLM",
                limit=peak / flops,
                limit_name="matmul peak",
            )
        )
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"prefill, {params:.0f}M-param Llama-like model, batch {batch} x {seq} tokens, {device}")
    print(f"{'dtype':5} {'ours tok/s':>12} {'HF tok/s':>12} {'ours/HF':>9} {'peak GF/s':>10} {'of peak':>8}")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
