"""Generation throughput: AstrAI's `InferenceEngine` against Hugging Face transformers `generate`, same weights.

One random Llama-layout checkpoint is written by transformers and loaded by both: about 20M parameters on the
CPU, a 0.5B-class model (Qwen2.5-0.5B's shape: 24 layers of 896, 14 query and 2 KV heads, 151,936 tokens, tied
embeddings) on CUDA (`--model` picks either). For each dtype (fp32, bf16) the run measures, greedy and without
early stops (every request produces exactly its requested number of tokens; each figure the best of 3 runs on
both sides, one on CUDA, whose timings vary little; each of our runs starts from an empty prefix cache, since
the repeats send the same prompts and HF recomputes them every time):

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

On CUDA every figure of ours is measured twice, with decode steps replayed as CUDA graphs (the engine's default)
and without (`cuda_graphs=False`), against the same HF figure.

The limit column is the machine's bound for the same work: batch 1 `BW / W`; batched runs
`tokens / max(weight and KV reads / BW, 2 * N * tokens / FLOPS)` with FLOPS measured by a large matmul;
time to first token `2 * N * uncached prompt tokens / FLOPS`. N counts the weights a token multiplies by: every
one but the embedding for a generated token, and the LM head too only for those (a prompt token skips it).

    python benchmarks/bench_generate.py [--quick] [--dtypes fp32,bf16]      # or: astrai bench generate
    python benchmarks/bench_generate.py --device cuda --dtypes bf16         # the 0.5B model on the GPU
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

MODELS = {
    "20m": dict(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1152,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    "0.5b": dict(  # Qwen2.5-0.5B's shape, in the Llama layout both sides load
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sizes(quick: bool, repeats: int) -> dict[str, int]:
    if quick:
        return dict(
            b1_tokens=32, conc=16, conc_prompt=32, conc_tokens=32, mixed=16, mixed_prompt=128, mixed_out=64,
            repeats=repeats,
        )  # fmt: skip
    return dict(
        b1_tokens=128, conc=16, conc_prompt=64, conc_tokens=128, mixed=64, mixed_prompt=512, mixed_out=256,
        repeats=repeats,
    )  # fmt: skip


def _write_checkpoint(folder: Path, model: str, device: torch.device) -> None:
    """A random transformers Llama (initialised on `device`, saved in bfloat16 for the 0.5B model) plus a
    word-level tokenizer whose vocabulary matches it."""
    torch.manual_seed(0)
    hf_config = MODELS[model]
    config = transformers.LlamaConfig(**hf_config, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with device:
        hf = transformers.LlamaForCausalLM(config)
    if model != "20m":
        hf = hf.to(torch.bfloat16)  # half the bytes to write and read; fp32 runs widen the same values
    hf.save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, hf_config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


def _bandwidth(device: torch.device) -> float:
    """Bytes/s of a tensor copy (read + write) of 256 MiB (1 GiB on a GPU), best of 5."""
    src = torch.ones((256 if device.type == "cuda" else 64) * 2**20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * src.element_size() / best


def _flops(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a square matmul in `dtype` (1024 wide; 8192 on a GPU), best of 5."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * n**3 / best


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _best(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs (shared machines are noisy; the fastest is the least disturbed)."""
    return min(_timed(fn) for _ in range(repeats))


def _hf_generate(model, prompts: list[list[int]], new_tokens: int) -> None:
    """One static batch: left-padded prompts, exactly `new_tokens` greedy tokens per row."""
    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
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


class _Workloads:
    """The requests every figure sends, drawn once so that every variant of ours and HF get the same."""

    def __init__(self, sizes: dict[str, int], vocab: int, variants: int):
        rng = random.Random(0)

        def prompt(n: int) -> list[int]:
            return [rng.randrange(3, vocab) for _ in range(n)]

        self.b1 = prompt(16)
        self.conc = [prompt(sizes["conc_prompt"]) for _ in range(sizes["conc"])]
        self.mixed = [prompt(rng.randint(16, sizes["mixed_prompt"])) for _ in range(sizes["mixed"])]
        self.mixed_out = [rng.randint(16, sizes["mixed_out"]) for _ in range(sizes["mixed"])]
        # Time to first token: a fresh 512-token prefix for every repeat of every variant (and of HF), so that
        # "cold" never hits what an earlier run cached; two different 16-token tails for each.
        self.ttft = [
            [(prefix, prompt(16), prompt(16)) for prefix in (prompt(512) for _ in range(sizes["repeats"]))]
            for _ in range(variants + 1)
        ]


class _Setup:
    """One dtype's models and the machine's bounds for its figures."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, bw: float):
        self.hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.hf.generation_config.eos_token_id = None  # every row generates exactly the requested tokens
        self.model = AutoModel.from_pretrained(folder, dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model = self.model
        n_params = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once
        # A decode step reads one embedding row and every other weight, the LM head's too.
        self.n_read = (
            n_params - model.embed_tokens.weight.numel() + model.lm_head.weight.numel() * model.config.tie_weight
        )
        bits = torch.finfo(dtype).bits
        self.weight_bytes = self.n_read * bits // 8
        self.n_prompt = self.n_read - model.lm_head.weight.numel()  # a prompt token's weights: no LM head
        cfg = model.config
        self.kv_tok = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bits // 8
        self.bw = bw
        self.flops = _flops(dtype, device)


def _run_dtype(folder: Path, name: str, sizes: dict[str, int], device: torch.device, bw: float) -> list[dict]:
    setup = _Setup(folder, DTYPES[name], device, bw)
    variants = [("", True)] if device.type == "cpu" else [(", CUDA graphs", True), (", no CUDA graphs", False)]
    work = _Workloads(sizes, setup.model.config.vocab_size, len(variants))
    reps = sizes["repeats"]
    hf = setup.hf
    _hf_generate(hf, [work.b1], 8)  # warm-up
    n = sizes["b1_tokens"]
    peers = {"b1": n / _best(lambda: _hf_generate(hf, [work.b1], n), reps)}
    b, n = sizes["conc"], sizes["conc_tokens"]
    peers["conc"] = b * n / _best(lambda: _hf_generate(hf, work.conc, n), reps)
    m, outputs = sizes["mixed"], work.mixed_out
    batches = [(work.mixed[i : i + 16], max(outputs[i : i + 16])) for i in range(0, m, 16)]
    peers["mixed"] = sum(outputs) / _best(lambda: [_hf_generate(hf, *batch) for batch in batches], reps)
    peers["ttft"] = min(_timed(partial(_hf_generate, hf, [prefix + first], 1)) for prefix, first, _ in work.ttft[-1])
    rows = []
    for (label, graphs), ttft in zip(variants, work.ttft, strict=False):
        ours = _measure_ours(setup, f"{name}{label}", graphs, sizes, work, ttft, peers)
        _print_rows(ours)  # as they come: a long run shows its figures before it ends
        rows += ours
    return rows


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"{r['metric']:<44}{r['unit']:>6}{r['ours']:>10.1f}{r['peer']:>10.1f}{r['ours'] / r['peer']:>7.2f}x"
            f"{r['limit']:>10.1f}{100 * r['ours'] / r['limit']:>9.0f}%  {r['peer_name']}",
            flush=True,
        )


def _measure_ours(setup: _Setup, name: str, graphs: bool, sizes, work: _Workloads, ttft, peers) -> list[dict]:
    """Our figures for one engine configuration (`graphs`: CUDA graphs on), each beside HF's."""
    reps = sizes["repeats"]
    model, tokenizer = setup.model, setup.tokenizer
    engine = InferenceEngine(
        model, tokenizer, max_batch_size=16, max_seq_len=1024, model_name="bench", cuda_graphs=graphs
    )
    limits = (setup.n_read, setup.n_prompt, setup.weight_bytes, setup.kv_tok, setup.bw, setup.flops)
    rows = []
    try:
        _ours(engine, [work.b1], [8])  # warm-up
        n = sizes["b1_tokens"]
        ours = n / _best(lambda: _ours(engine, [work.b1], [n]), reps)
        rows.append(_row(f"decode batch 1, {name}", ours, peers["b1"], setup.bw / setup.weight_bytes,
                         "memory-bandwidth bound W/BW"))  # fmt: skip

        b, n = sizes["conc"], sizes["conc_tokens"]
        ours = b * n / _best(lambda: _ours(engine, work.conc, [n] * b), reps)
        limit = _batch_limit(b, n, sizes["conc_prompt"], *limits)
        rows.append(_row(f"{b} concurrent, {name}", ours, peers["conc"], limit, "bandwidth/compute bound"))

        m, outputs = sizes["mixed"], work.mixed_out
        total = sum(outputs)
        ours = total / _best(lambda: _ours(engine, work.mixed, outputs), reps)
        limit = _mixed_limit(work.mixed, outputs, 16, *limits)
        rows.append(_row(f"mixed {m} requests, {name}", ours, peers["mixed"], limit, "bandwidth/compute bound"))

        # Time to first token of a 528-token prompt, cold and with its first 512 tokens in the prefix cache.
        cold, warm = [], []
        for prefix, first, second in ttft:
            cold.append(_timed(partial(_ours, engine, [prefix + first], [1])))
            warm.append(_timed(partial(_ours, engine, [prefix + second], [1], reuse_prefixes=True)))
        floor = 2 * setup.n_prompt / setup.flops * 1e3  # ms of compute per prompt token
        rows.append(
            dict(metric=f"TTFT 528-token prompt, {name}", unit="ms", ours=1e3 * min(cold), peer=1e3 * peers["ttft"],
                 peer_name="HF generate", limit=528 * floor, limit_name="compute bound")
        )  # fmt: skip
        rows.append(
            dict(metric=f"TTFT, 512 of it cached, {name}", unit="ms", ours=1e3 * min(warm), peer=1e3 * min(cold),
                 peer_name="ours cold", limit=16 * floor, limit_name="compute bound")
        )  # fmt: skip
    finally:
        engine.shutdown()
    # The mixed workload again with every request in flight, on an engine of its own (started only now: the
    # first engine's shutdown dropped the packed weights the two would otherwise share).
    wide = InferenceEngine(model, tokenizer, max_batch_size=m, max_seq_len=1024, model_name="bench", cuda_graphs=graphs)
    try:
        ours = total / _best(lambda: _ours(wide, work.mixed, outputs), reps)
    finally:
        wide.shutdown()
    limit = _mixed_limit(work.mixed, outputs, m, *limits)
    rows.insert(3, _row(f"mixed {m}, all in flight, {name}", ours, peers["mixed"], limit, "bandwidth/compute bound"))
    return rows


def _batch_limit(b, n, prompt_len, n_read, n_prompt, weight_bytes, kv_tok, bw, flops) -> float:
    # Per decode step: the weights once plus every row's KV (mean context); compute 2*N per token.
    step = max((weight_bytes + b * (prompt_len + n / 2) * kv_tok) / bw, 2 * n_read * b / flops)
    prefill = 2 * n_prompt * b * prompt_len / flops
    return b * n / (n * step + prefill)


def _mixed_limit(prompts, outputs, in_flight, n_read, n_prompt, weight_bytes, kv_tok, bw, flops) -> float:
    # At least ceil(tokens / in_flight) decode steps each reading the weights; every token costs 2*N FLOPs.
    tokens = sum(outputs)
    steps = -(-tokens // in_flight)
    kv_reads = sum(n * (len(p) + n / 2) for p, n in zip(prompts, outputs, strict=True)) * kv_tok
    memory = (steps * weight_bytes + kv_reads) / bw
    compute = 2 * (n_read * tokens + n_prompt * sum(len(p) for p in prompts)) / flops
    return tokens / max(memory, compute)


def _row(metric: str, ours: float, peer: float, limit: float, limit_name: str) -> dict:
    return dict(metric=metric, unit="tok/s", ours=ours, peer=peer, peer_name="HF generate", limit=limit,
                limit_name=limit_name)  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: 20m on cpu, 0.5b on cuda")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure, best kept (default 3; cuda 1)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.dtypes.split(",")
    unknown = sorted(set(names) - set(DTYPES))
    if unknown:
        raise ValueError(f"--dtypes {unknown}: allowed {sorted(DTYPES)}")
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: allowed cpu, cuda")
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)  # the timers synchronise the current device
    model = args.model or ("0.5b" if on_gpu else "20m")
    sizes = _sizes(args.quick, args.repeats or (1 if on_gpu else 3))
    bw = _bandwidth(device)
    where = torch.cuda.get_device_name(device) if on_gpu else f"cpu, torch threads: {torch.get_num_threads()}"
    print(f"{where}; model {model}; memory bandwidth (copy): {bw / 1e9:.1f} GB/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp), model, device)
        for name in names:
            started = time.perf_counter()
            rows += _run_dtype(Path(tmp), name, sizes, device, bw)
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    print(f"{'figure':<44}{'unit':>6}{'ours':>10}{'peer':>10}{'ratio':>8}{'limit':>10}{'of limit':>10}  peer")
    _print_rows(rows)
    return rows


if __name__ == "__main__":
    main()
