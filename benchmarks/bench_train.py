"""Training throughput of `Trainer` against a plain hand-written PyTorch loop on the same model and data.

Both run the same `AutoRegressiveLM` (random init, same seed), the same SEQ dataset through the same kind of
DataLoader, AdamW, gradient clipping at 1.0 and a `loss.item()` per step, in float32 and with bf16
autocast (fp32 master weights). The Trainer runs with its default callbacks (clipping, metric log,
progress bar, checkpoint at the end) and computes the exact token-mean loss; the plain loop is the usual
`cross_entropy(mean)`. A run's speed is its median step time after `--warmup` steps; the two take turns
for `--rounds` rounds and the best round of each counts, so a noisy neighbour on a shared machine slows
both alike.

MFU = tokens/s x FLOPs per token / measured matmul peak (a large matmul in the same dtype), with FLOPs per
token = 6 N + 12 L H Q T (PaLM / nanoGPT: N the non-embedding parameters, LM head included; L layers,
H heads of size Q, T the sequence length).

    python benchmarks/bench_train.py [--quick] [--device cuda] [--batch 8] [--seq 128] [--steps 6] [--threads 1]
    astrai bench train [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from astrai.config import AutoRegressiveLMConfig, TrainConfig
from astrai.dataset import DatasetFactory, save_mmap
from astrai.model import AutoRegressiveLM
from astrai.trainer import OptimizerFn, Trainer

PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config(device: torch.device, quick: bool) -> AutoRegressiveLMConfig:
    if device.type == "cuda" and not quick:  # ~200M parameters: big enough to load an H100
        return AutoRegressiveLMConfig(
            vocab_size=32000, dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, dim_ffn=2816, max_len=2048
        )
    dim, layers = (128, 2) if quick else (256, 4)
    return AutoRegressiveLMConfig(
        vocab_size=4096, dim=dim, n_layers=layers, n_heads=8, n_kv_heads=4, dim_ffn=dim * 8 // 3, max_len=2048
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model: AutoRegressiveLM, seq: int) -> float:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    if not cfg.tie_weight:  # a tied embedding is the LM head's matmul: it counts
        params -= model.embed_tokens.weight.numel()
    return 6 * params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the best of five n x n x n matmuls (n = 8192 on GPU, 2048 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def plain_loop(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, precision: str, device: torch.device, steps: int
) -> list[float]:
    """The reference: what one writes by hand. Returns the time at the end of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    stamps = []
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["target_ids"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(ids)["logits"]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        stamps.append(time.perf_counter())
    return stamps


class _Stamps:
    """Callback recording the time at the end of each optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_step_end(self, context) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())


def trainer_run(
    model: torch.nn.Module, dataset, precision: str, device: torch.device, batch: int, folder: Path
) -> list[float]:
    stamps = _Stamps(device)
    config = TrainConfig(
        model=model,
        strategy="seq",
        dataset=dataset,
        optimizer_fn=OptimizerFn("adamw", lr=3e-4),
        batch_per_device=batch,
        max_grad_norm=1.0,
        mixed_precision="bf16" if precision == "bf16" else "no",
        device_type=device.type,
        ckpt_dir=str(folder / "ckpt"),
        ckpt_interval=0,
        log_dir=str(folder / "logs"),
        log_interval=10,
    )
    Trainer(config, callbacks=[stamps]).train()
    return stamps.stamps


def tokens_per_second(stamps: list[float], warmup: int, tokens_per_step: int) -> float:
    """From the median duration of the steps after the warm-up (robust to a neighbour's burst)."""
    timed = stamps[warmup - 1 :]  # from the end of the last warm-up step
    return tokens_per_step / statistics.median(b - a for a, b in zip(timed, timed[1:]))


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the training-throughput table; return one `astrai bench` row per precision."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; GPU 16)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; GPU 1024)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds, best counts (default 2)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda" and not args.quick
    batch = args.batch or (16 if gpu else 8)
    seq = args.seq or (1024 if gpu else (64 if args.quick else 128))
    steps = args.steps or (3 if args.quick else 6)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 2)
    total_steps = args.warmup + steps

    torch.manual_seed(0)
    model = AutoRegressiveLM(model_config(device, args.quick))
    flops = flops_per_token(model, seq)
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n_tokens = total_steps * batch * seq + 1
        tokens = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
        save_mmap(folder / "data", {"sequence": [tokens]})
        dataset = DatasetFactory.load("seq", folder / "data", window_size=seq)
        for precision in args.precision:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
            runs: dict[str, Callable[[int], list[float]]] = {
                "plain": lambda r, p=precision, lo=loader: plain_loop(
                    copy.deepcopy(model).to(device), lo, p, device, total_steps
                ),
                "trainer": lambda r, p=precision: trainer_run(
                    copy.deepcopy(model), dataset, p, device, batch, folder / f"{p}-{r}"
                ),
            }
            best = dict.fromkeys(runs, 0.0)
            for r in range(rounds):
                for name, run in runs.items():
                    best[name] = max(best[name], tokens_per_second(run(r), args.warmup, batch * seq))
            peak = matmul_peak(_DTYPES[precision], device)
            mfu = {name: tps * flops / peak for name, tps in best.items()}
            lines.append(
                f"{precision:5} {best['trainer']:12,.0f} {best['plain']:12,.0f} {best['trainer'] / best['plain']:9.3f}x"
                f" {peak / 1e9:10,.1f} {mfu['trainer']:8.1%} {mfu['plain']:8.1%}"
            )
            rows.append(
                dict(
                    metric=f"train {batch}x{seq} {precision} ({device.type})",
                    unit="tok/s",
                    ours=best["trainer"],
                    peer=best["plain"],
                    peer_name="plain PyTorch loop",
                    limit=peak / flops,
                    limit_name="matmul peak",
                )
            )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"training, {params:.1f}M-param model, batch {batch} x {seq} tokens, {steps} timed steps x {rounds} rounds, {device}"
    )
    print(
        f"{'prec':5} {'Trainer tok/s':>12} {'plain tok/s':>12} {'Trainer/plain':>10} {'peak GF/s':>10} "
        f"{'MFU Tr.':>8} {'MFU plain':>8}"
    )
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
