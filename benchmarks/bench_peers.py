"""Generation speed against the engines CPU users run instead: llama.cpp, vLLM's CPU build and HF, same weights.

The workloads are `bench_generate.py`'s (batch-1 decode, 16 concurrent, 64 mixed requests with 16 and with
all in flight, time to first token of a 528-token prompt cold and with 512 tokens cached), sent as token ids,
greedy, never stopping early, best of `--repeats` runs. Each engine runs in its own process with `--threads`
threads (`peers/run_engine.py`); the peers run from their own virtual environments, made by
`bash benchmarks/peers/setup.sh` (never dependencies of ours). A peer that is not installed is skipped with a
line saying so. The models: the 20M benchmark model and the 0.5B one (Qwen2.5-0.5B's shape), random weights
written once by transformers; llama.cpp reads the same weights converted by its own `convert_hf_to_gguf.py`
at the same precision (f32 / bf16).

Printed per model and dtype: every engine's figure, the best peer's, ours against it as a speed ratio (above
1 means ours is faster, for time to first token too), the machine's limit (memory bandwidth for batch-1
decode, the measured matmul peak for prefill) and how many of the batch-1 greedy tokens each engine shares
with ours.

    python benchmarks/bench_peers.py [--quick] [--models 20m,0.5b] [--dtypes fp32,bf16]   # or: astrai bench peers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark whose workloads these are
from bench_generate import MODELS, _bandwidth, _flops, _sizes, _Workloads, _write_checkpoint

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peers" / "run_engine.py"
VENVS = Path(os.environ.get("ASTRAI_PEERS", HERE / "peers" / ".venvs"))
SETUP = "bash benchmarks/peers/setup.sh"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIGURES = [  # key, label, unit, higher is better
    ("b1", "decode batch 1", "tok/s", True),
    ("conc", "16 concurrent", "tok/s", True),
    ("mixed16", "mixed 64, 16 in flight", "tok/s", True),
    ("mixed_all", "mixed 64, all in flight", "tok/s", True),
    ("ttft_cold", "TTFT 528-token prompt, cold", "ms", False),
    ("ttft_cached", "TTFT, 512 tokens cached", "ms", False),
]


def weights_read(hf: dict) -> tuple[int, int]:
    """(weights a decode token reads, weights a prompt token multiplies by) of a Llama-layout config."""
    d, f, layers, v = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["vocab_size"]
    kv = d // hf["num_attention_heads"] * hf["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    trunk = layers * per_layer + d
    return trunk + v * d, trunk  # the LM head is read by a generated token only


def engines(gguf: Path | None) -> dict[str, list[str] | str]:
    """Engine name -> command prefix, or a line saying why it is skipped."""
    found: dict[str, list[str] | str] = {"astrai": [sys.executable, str(RUNNER), "astrai"]}
    found["hf"] = [sys.executable, str(RUNNER), "hf"]
    vllm = VENVS / "vllm" / "bin" / "python"
    found["vllm"] = [str(vllm), str(RUNNER), "vllm"] if vllm.exists() else f"not installed at {vllm}; run {SETUP}"
    llama, server = VENVS / "llama" / "bin" / "python", VENVS / "llama" / "bin" / "llama-server"
    if not (llama.exists() and server.exists()):
        found["llama.cpp"] = f"not installed at {llama.parent}; run {SETUP}"
    elif gguf is None:
        found["llama.cpp"] = "the GGUF conversion failed (see above)"
    else:
        found["llama.cpp"] = [str(llama), str(RUNNER), "llama.cpp", "--gguf", str(gguf), "--llama-server", str(server)]
    return found


def convert(folder: Path, vocab_size: int, dtype: str) -> Path | None:
    """The checkpoint as GGUF at `dtype`, by llama.cpp's own converter; None when llama.cpp is absent or fails."""
    python, script = VENVS / "llama" / "bin" / "python", VENVS / "llama" / "convert_hf_to_gguf.py"
    if not script.exists():
        return None
    if not (folder / "tokenizer.model").exists():
        subprocess.run([str(python), str(HERE / "peers" / "spm_vocab.py"), str(folder), str(vocab_size)], check=True)
    out = folder / f"model-{dtype}.gguf"
    outtype = {"fp32": "f32", "bf16": "bf16"}[dtype]
    proc = subprocess.run([str(python), str(script), str(folder), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        print(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return out


def run_engine(command: list[str], folder: Path, dtype: str, spec: Path, args) -> dict | str:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        full = [*command, "--model", str(folder), "--dtype", dtype, "--spec", str(spec), "--threads",
                str(args.threads), "--repeats", str(args.repeats), "--out", out.name]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(full, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        return json.loads(Path(out.name).read_text())


def speed_ratio(ours: float, peer: float, higher_is_better: bool) -> float:
    return ours / peer if higher_is_better else peer / ours


def report(model: str, dtype: str, results: dict[str, dict], limits: dict[str, float]) -> list[dict]:
    names = [n for n in results if n != "astrai"]
    print(f"\n{model}, {dtype}")
    print(f"{'figure':<30}{'unit':>6}{'ours':>9}" + "".join(f"{n:>11}" for n in names) + f"{'ours vs best':>14}"
          f"{'limit':>9}{'of limit':>10}")  # fmt: skip
    rows = []
    ours_all = results["astrai"]
    for key, label, unit, higher in FIGURES:
        if key not in ours_all:
            continue
        scale = 1 if higher else 1e3  # seconds -> ms
        ours = ours_all[key] * scale
        peers = {n: results[n][key] * scale for n in names if key in results[n]}
        best_name = (max if higher else min)(peers, key=peers.get) if peers else None
        cells = "".join(f"{peers[n]:>11.1f}" if n in peers else f"{'-':>11}" for n in names)
        ratio = f"{speed_ratio(ours, peers[best_name], higher):>8.2f}x {best_name}" if best_name else "-"
        limit = limits.get(key)
        share = f"{100 * (ours / limit if higher else limit / ours):>9.0f}%" if limit else ""
        print(f"{label:<30}{unit:>6}{ours:>9.1f}{cells}  {ratio:<14}{limit or 0:>8.1f}{share}")
        rows.append(dict(metric=f"{label}, {model} {dtype}", unit=unit, ours=ours,
                         peer=peers[best_name] if best_name else None, peer_name=best_name or "",
                         limit=limit, limit_name="bandwidth bound" if key == "b1" else "compute bound" if limit else ""))  # fmt: skip
    greedy = ours_all["greedy"]
    for name in names:
        theirs = results[name]["greedy"]
        same = next((i for i, (a, b) in enumerate(zip(greedy, theirs)) if a != b), min(len(greedy), len(theirs)))
        print(f"greedy tokens equal to ours before the first difference, {name}: {same}/{len(greedy)}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads, the 20M model only")
    parser.add_argument("--models", default=None, help="comma-separated from 20m, 0.5b (default both; quick: 20m)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32, bf16")
    parser.add_argument("--threads", type=int, default=2, help="threads of every engine (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, best kept (default 3)")
    args = parser.parse_args(argv)
    models = (args.models or ("20m" if args.quick else "20m,0.5b")).split(",")
    dtypes = args.dtypes.split(",")
    for value, allowed, flag in ((models, MODELS, "--models"), (dtypes, DTYPES, "--dtypes")):
        if unknown := sorted(set(value) - set(allowed)):
            raise ValueError(f"{flag} {unknown}: allowed {sorted(allowed)}")
    torch.set_num_threads(args.threads)
    bw = _bandwidth(torch.device("cpu"))
    print(f"cpu, {args.threads} threads per engine; memory bandwidth (copy): {bw / 1e9:.1f} GB/s", flush=True)
    sizes = _sizes(args.quick, args.repeats)
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write_checkpoint(folder, model, torch.device("cpu"))
            work = _Workloads(sizes, MODELS[model]["vocab_size"], variants=0)
            spec = folder / "spec.json"
            spec.write_text(json.dumps(dict(
                b1=work.b1, b1_tokens=sizes["b1_tokens"], conc=work.conc, conc_tokens=sizes["conc_tokens"],
                mixed=work.mixed, mixed_out=work.mixed_out, ttft=work.ttft[0],
            )))  # fmt: skip
            n_read, n_prompt = weights_read(MODELS[model])
            for dtype in dtypes:
                bits = torch.finfo(DTYPES[dtype]).bits
                flops = _flops(DTYPES[dtype], torch.device("cpu"))
                limits = {"b1": bw / (n_read * bits / 8), "ttft_cold": 2 * n_prompt * 528 / flops * 1e3,
                          "ttft_cached": 2 * n_prompt * 16 / flops * 1e3}  # fmt: skip
                results: dict[str, dict] = {}
                for name, command in engines(convert(folder, MODELS[model]["vocab_size"], dtype)).items():
                    outcome = command if isinstance(command, str) else run_engine(command, folder, dtype, spec, args)
                    if isinstance(outcome, str):
                        print(f"{name}: skipped, {outcome}", flush=True)
                    else:
                        results[name] = outcome
                if "astrai" in results:
                    rows += report(model, dtype, results, limits)
    return rows


if __name__ == "__main__":
    main()
