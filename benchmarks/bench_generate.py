"""Generation throughput: AstrAI's `InferenceEngine` against Hugging Face transformers `generate`, same weights.

One random Llama-layout checkpoint (about 20M parameters) is written by transformers and loaded by both. For
each dtype (fp32, bf16) the run measures, greedy and without early stops (every request produces exactly
its requested number of tokens; each figure the best of 3 runs on both sides, and each of our runs starts
from an empty prefix cache, since the repeats send the same prompts and HF recomputes them every time):

- batch-1 decode tok/s, ours vs HF, and its share of the memory-bandwidth bound `BW / W`
  (W = bytes of the weights read per token; BW measured here by a large tensor copy);
- 16 concurrent same-length requests (aggregate tok/s), ours vs one HF batched `generate`;
- a mixed workload of 64 requests (prompts 16-512, outputs 16-256 tokens, fixed seed), ours (continuous
  batching, 16 at a time) vs HF static batching (batches of 16 in arrival order, left-padded to the longest
  prompt, generating until the batch's longest output is done). Throughput counts requested tokens only.
  A second row runs ours with all 64 in flight (`max_batch_size=64`: what a server with room for them does)
  against the same HF figure;
- time to first token (ms, lower is better) of a 528-token prompt: cold, ours vs HF, and with its first 512
  tokens already in our prefix cache (another request shared them), against our own cold figure.

The limit column is the machine's bound for the same work: batch 1 `BW / W`; batched runs
`tokens / max(weight and KV reads / BW, 2 * N * tokens / FLOPS)` with FLOPS measured by a large matmul;
time to first token `2 * N * uncached prompt tokens / FLOPS`.

    python benchmarks/bench_generate.py [--quick] [--dtypes fp32,bf16]      # or: astrai bench generate
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import transformers

from astrai.inference import InferenceEngine, SamplingParams
from astrai.model import AutoModel
from astrai.tokenize import AutoTokenizer

VOCAB = 8192
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=384,
    intermediate_size=1152,
    num_hidden_layers=8,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(
            b1_tokens=32, conc=16, conc_prompt=32, conc_tokens=32, mixed=16, mixed_prompt=128, mixed_out=64, repeats=3
        )
    return dict(
        b1_tokens=128, conc=16, conc_prompt=64, conc_tokens=128, mixed=64, mixed_prompt=512, mixed_out=256, repeats=3
    )


def _write_checkpoint(folder: Path) -> None:
    """A random transformers Llama plus a word-level tokenizer whose vocabulary matches it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**HF_CONFIG, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


def _bandwidth() -> float:
    """Bytes/s of a 256 MiB tensor copy (read + write), best of 5."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * src.element_size() / best


def _flops(dtype: torch.dtype) -> float:
    """FLOP/s of a 1024-wide square matmul in `dtype`, best of 5."""
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 1024**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs (shared machines are noisy; the fastest is the least disturbed)."""
    return min(_timed(fn) for _ in range(repeats))


def _hf_generate(model, prompts: list[list[int]], new_tokens: int) -> None:
    """One static batch: left-padded prompts, exactly `new_tokens` greedy tokens per row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def _ours(engine: InferenceEngine, prompts: list[list[int]], outputs: list[int], reuse_prefixes: bool = False) -> None:
    """Run the requests to completion; unless `reuse_prefixes`, nothing computed by earlier runs is reused (the
    repeats of a figure send the same prompts, which HF recomputes every time)."""
    if not reuse_prefixes:
        engine.reset_prefix_cache()
    handles = [
        engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        for p, n in zip(prompts, outputs, strict=True)
    ]
    for handle, n in zip(handles, outputs, strict=True):
        *_, final = handle.iter_sync()
        if final.completion_tokens != n:
            raise RuntimeError(f"expected {n} tokens, got {final.completion_tokens} ({final.finish_reason})")


def _run_dtype(folder: Path, name: str, sizes: dict[str, int], bw: float) -> list[dict]:
    dtype = DTYPES[name]
    rng = random.Random(0)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # every row generates exactly the requested tokens
    model = AutoModel.from_pretrained(folder, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_read = n_params - model.embed_tokens.weight.numel()  # a decode step reads one embedding row
    weight_bytes = n_read * torch.finfo(dtype).bits // 8
    cfg = model.config
    kv_tok = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    flops = _flops(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = InferenceEngine(model, tokenizer, max_batch_size=16, max_seq_len=1024, model_name="bench")
    rows = []
    reps = sizes["repeats"]
    try:
        prompt = [rng.randrange(3, VOCAB) for _ in range(16)]
        _ours(engine, [prompt], [8])  # warm-up
        _hf_generate(hf, [prompt], 8)
        n = sizes["b1_tokens"]
        ours = n / _best(lambda: _ours(engine, [prompt], [n]), reps)
        peer = n / _best(lambda: _hf_generate(hf, [prompt], n), reps)
        rows.append(_row(f"decode batch 1, {name}", ours, peer, bw / weight_bytes, "memory-bandwidth bound W/BW"))

        b, n = sizes["conc"], sizes["conc_tokens"]
        prompts = [[rng.randrange(3, VOCAB) for _ in range(sizes["conc_prompt"])] for _ in range(b)]
        ours = b * n / _best(lambda: _ours(engine, prompts, [n] * b), reps)
        peer = b * n / _best(lambda: _hf_generate(hf, prompts, n), reps)
        limit = _batch_limit(b, n, sizes["conc_prompt"], n_read, weight_bytes, kv_tok, bw, flops)
        rows.append(_row(f"{b} concurrent, {name}", ours, peer, limit, "bandwidth/compute bound"))

        m = sizes["mixed"]
        prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(16, sizes["mixed_prompt"]))] for _ in range(m)]
        outputs = [rng.randint(16, sizes["mixed_out"]) for _ in range(m)]
        total = sum(outputs)
        ours = total / _best(lambda: _ours(engine, prompts, outputs), reps)
        peer = total / _best(
            lambda: [_hf_generate(hf, prompts[i : i + 16], max(outputs[i : i + 16])) for i in range(0, m, 16)], reps
        )
        limit = _mixed_limit(prompts, outputs, 16, n_read, weight_bytes, kv_tok, bw, flops)
        rows.append(_row(f"mixed {m} requests, {name}", ours, peer, limit, "bandwidth/compute bound"))
        mixed_peer = peer

        # Time to first token of a 528-token prompt, cold and with its first 512 tokens in the prefix cache.
        # Every repeat draws a new prefix, so "cold" never hits what an earlier repeat cached.
        cold, warm, hf_cold = [], [], []
        for _ in range(reps):
            prefix = [rng.randrange(3, VOCAB) for _ in range(512)]
            first, second = ([rng.randrange(3, VOCAB) for _ in range(16)] for _ in range(2))
            cold.append(_timed(partial(_ours, engine, [prefix + first], [1])))
            warm.append(_timed(partial(_ours, engine, [prefix + second], [1], reuse_prefixes=True)))
            hf_cold.append(_timed(partial(_hf_generate, hf, [prefix + first], 1)))
        floor = 2 * n_read / flops * 1e3  # ms of compute per prompt token
        rows.append(
            dict(
                metric=f"TTFT 528-token prompt, {name}",
                unit="ms",
                ours=1e3 * min(cold),
                peer=1e3 * min(hf_cold),
                peer_name="HF generate",
                limit=528 * floor,
                limit_name="compute bound",
            )
        )
        rows.append(
            dict(metric=f"TTFT, 512 of it cached, {name}", unit="ms", ours=1e3 * min(warm), peer=1e3 * min(cold),
                 peer_name="ours cold", limit=16 * floor, limit_name="compute bound")
        )  # fmt: skip
    finally:
        engine.shutdown()
    # The mixed workload again with every request in flight, on an engine of its own (started only now: the
    # first engine's shutdown dropped the packed weights the two would otherwise share).
    wide = InferenceEngine(model, tokenizer, max_batch_size=m, max_seq_len=1024, model_name="bench")
    try:
        ours = total / _best(lambda: _ours(wide, prompts, outputs), reps)
    finally:
        wide.shutdown()
    limit = _mixed_limit(prompts, outputs, m, n_read, weight_bytes, kv_tok, bw, flops)
    rows.insert(3, _row(f"mixed {m}, all in flight, {name}", ours, mixed_peer, limit, "bandwidth/compute bound"))
    return rows


def _batch_limit(b, n, prompt_len, n_read, weight_bytes, kv_tok, bw, flops) -> float:
    # Per decode step: the weights once plus every row's KV (mean context); compute 2*N per token.
    step = max((weight_bytes + b * (prompt_len + n / 2) * kv_tok) / bw, 2 * n_read * b / flops)
    prefill = 2 * n_read * b * prompt_len / flops
    return b * n / (n * step + prefill)


def _mixed_limit(prompts, outputs, in_flight, n_read, weight_bytes, kv_tok, bw, flops) -> float:
    # At least ceil(tokens / in_flight) decode steps each reading the weights; every token costs 2*N FLOPs.
    tokens = sum(outputs)
    steps = -(-tokens // in_flight)
    kv_reads = sum(n * (len(p) + n / 2) for p, n in zip(prompts, outputs, strict=True)) * kv_tok
    memory = (steps * weight_bytes + kv_reads) / bw
    compute = 2 * n_read * (tokens + sum(len(p) for p in prompts)) / flops
    return tokens / max(memory, compute)


def _row(metric: str, ours: float, peer: float, limit: float, limit_name: str) -> dict:
    return dict(metric=metric, unit="tok/s", ours=ours, peer=peer, peer_name="HF generate", limit=limit,
                limit_name=limit_name)  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.dtypes.split(",")
    unknown = sorted(set(names) - set(DTYPES))
    if unknown:
        raise ValueError(f"--dtypes {unknown}: allowed {sorted(DTYPES)}")
    sizes = _sizes(args.quick)
    bw = _bandwidth()
    print(f"memory bandwidth (copy): {bw / 1e9:.1f} GB/s; torch threads: {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp))
        for name in names:
            rows += _run_dtype(Path(tmp), name, sizes, bw)
    print(f"{'figure':<34}{'unit':>6}{'ours':>10}{'peer':>10}{'ratio':>8}{'limit':>10}{'of limit':>10}  peer")
    for r in rows:
        print(
            f"{r['metric']:<34}{r['unit']:>6}{r['ours']:>10.1f}{r['peer']:>10.1f}{r['ours'] / r['peer']:>7.2f}x"
            f"{r['limit']:>10.1f}{100 * r['ours'] / r['limit']:>9.0f}%  {r['peer_name']}"
        )
    return rows


if __name__ == "__main__":
    main()
