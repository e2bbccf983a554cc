"""Run one engine over the peer benchmark's workloads and write its figures as JSON (`bench_peers.py` drives it).

Each engine runs in its own process and, for the peers, in its own virtual environment (see `setup.sh`), so
this file imports nothing from AstrAI at the top: only the standard library and, inside each engine's class,
that engine's own package. Every engine gets the same token-id prompts (no tokenizer in the timed path),
decodes greedily and never stops early (each request produces exactly its requested tokens), and keeps the
best of `repeats` runs of each figure.

Figures (a figure an engine cannot produce is absent):
- `b1`: batch-1 decode, tok/s (generated tokens over the time of a whole request, prefill included);
- `conc`: 16 concurrent same-length requests, aggregate tok/s;
- `mixed16` / `mixed_all`: the 64 mixed requests, with 16 / all of them in flight, tok/s of requested tokens;
- `ttft_cold` / `ttft_cached`: seconds to the first token of a 528-token prompt, with nothing cached / with
  its first 512 tokens computed by an earlier request.
- `greedy`: the batch-1 request's tokens, to check that the engines computed the same thing.

    python run_engine.py ENGINE --model DIR [--gguf FILE] --dtype fp32|bf16 --spec spec.json --out out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def best(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs (a noisy neighbour slows runs, never speeds them)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class Engine:
    """What each engine implements: run requests to completion, with `in_flight` of them at once."""

    # Whether the engine keeps KV of earlier requests for reuse (HF does not); a run that must not reuse
    # anything calls `forget()` first.
    caches_prefixes = True

    def generate(self, prompts: list[list[int]], outputs: list[int], in_flight: int) -> list[list[int]]:
        raise NotImplementedError

    def forget(self) -> None:
        """Drop every cached prefix, so the next request is computed from scratch."""

    def close(self) -> None:
        pass


class AstrAI(Engine):
    def __init__(self, args: argparse.Namespace):
        import torch

        from astrai.inference import InferenceEngine, SamplingParams

        torch.set_num_threads(args.threads)
        self.params = SamplingParams
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        self.make = lambda in_flight: InferenceEngine.from_pretrained(
            args.model, dtype=dtype, max_batch_size=in_flight, max_seq_len=1024
        )
        self.engines: dict[int, object] = {}

    def _engine(self, in_flight: int):
        if in_flight not in self.engines:
            for engine in self.engines.values():  # one engine at a time: each holds its packed weights
                engine.shutdown()
            self.engines = {in_flight: self.make(in_flight)}
        return self.engines[in_flight]

    def generate(self, prompts, outputs, in_flight):
        engine = self._engine(in_flight)
        handles = [
            engine.submit(p, self.params(max_tokens=n, temperature=0.0, ignore_eos=True))
            for p, n in zip(prompts, outputs, strict=True)
        ]
        return [[t for event in handle.iter_sync() for t in event.token_ids] for handle in handles]

    def forget(self):
        for engine in self.engines.values():
            engine.reset_prefix_cache()

    def close(self):
        for engine in self.engines.values():
            engine.shutdown()


class HF(Engine):
    """transformers `generate`: static batches of `in_flight` requests in arrival order, left-padded."""

    caches_prefixes = False

    def __init__(self, args: argparse.Namespace):
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        self.torch = torch
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        self.model.generation_config.eos_token_id = None  # every row generates exactly the requested tokens

    def generate(self, prompts, outputs, in_flight):
        results = []
        for i in range(0, len(prompts), in_flight):
            batch, n = prompts[i : i + in_flight], max(outputs[i : i + in_flight])
            width = max(len(p) for p in batch)
            ids = self.torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with self.torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0
                )
            results += [row[width : width + k].tolist() for row, k in zip(out, outputs[i : i + in_flight])]
        return results


class VLLM(Engine):
    """vLLM's offline `LLM` (the CPU build), prefix caching on; one `LLM` per `in_flight` (`max_num_seqs`)."""

    def __init__(self, args: argparse.Namespace):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        self.args = args
        self.llms: dict[int, object] = {}

    def _llm(self, in_flight: int):
        from vllm import LLM

        if in_flight not in self.llms:
            self.close()
            dtype = {"fp32": "float32", "bf16": "bfloat16"}[self.args.dtype]
            self.llms = {
                in_flight: LLM(
                    model=self.args.model,
                    dtype=dtype,
                    max_num_seqs=in_flight,
                    max_model_len=1024,
                    enable_prefix_caching=True,
                )
            }
        return self.llms[in_flight]

    def generate(self, prompts, outputs, in_flight):
        from vllm import SamplingParams, TokensPrompt

        llm = self._llm(in_flight)
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False) for n in outputs]
        done = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in done]

    def forget(self):
        for llm in self.llms.values():
            llm.reset_prefix_cache()

    def close(self):
        self.llms.clear()
        import gc

        gc.collect()


class LlamaCpp(Engine):
    """llama.cpp: in-process (llama-cpp-python) for one request at a time; for several in flight, its
    `llama-server` with `--parallel in_flight` slots and continuous batching, driven over HTTP by threads."""

    def __init__(self, args: argparse.Namespace):
        from llama_cpp import Llama

        self.args = args
        self.llm = Llama(model_path=args.gguf, n_ctx=1024, n_batch=512, n_threads=args.threads, verbose=False)
        self.servers: dict[int, tuple[subprocess.Popen, int]] = {}

    def _one(self, prompt: list[int], n: int) -> list[int]:
        tokens = []
        for token in self.llm.generate(prompt, top_k=1, temp=0.0):  # reuses a cached prefix of the last prompt
            tokens.append(token)
            if len(tokens) == n:
                break
        return tokens

    def _server(self, in_flight: int) -> int:
        if in_flight not in self.servers:
            self._stop_servers()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            command = [self.args.llama_server, "-m", self.args.gguf, "--host", "127.0.0.1", "--port", str(port),
                       "-t", str(self.args.threads), "--parallel", str(in_flight), "--cont-batching",
                       "-c", str(1024 * in_flight), "-b", "512"]  # fmt: skip
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"llama-server did not start: {' '.join(command)}") from None
                    time.sleep(0.5)
            self.servers[in_flight] = (proc, port)
        return self.servers[in_flight][1]

    def generate(self, prompts, outputs, in_flight):
        if in_flight == 1 and len(prompts) == 1:
            return [self._one(prompts[0], outputs[0])]
        port = self._server(in_flight)

        def post(request: tuple[list[int], int]) -> list[int]:
            prompt, n = request
            body = dict(prompt=prompt, n_predict=n, temperature=0.0, top_k=1, ignore_eos=True, cache_prompt=True,
                        return_tokens=True)  # fmt: skip
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=3600) as r:
                return json.load(r)["tokens"]

        with ThreadPoolExecutor(in_flight) as pool:
            return list(pool.map(post, zip(prompts, outputs, strict=True)))

    def forget(self):
        self.llm.reset()  # the in-process state holds the last prompt's KV, reused on a shared prefix

    def _stop_servers(self):
        for proc, _ in self.servers.values():
            proc.terminate()
            proc.wait()
        self.servers.clear()

    def close(self):
        self._stop_servers()


ENGINES = {"astrai": AstrAI, "hf": HF, "vllm": VLLM, "llama.cpp": LlamaCpp}


def measure(engine: Engine, spec: dict, repeats: int) -> dict:
    def run(prompts, outputs, in_flight, reuse=False):
        if not reuse:
            engine.forget()
        return engine.generate(prompts, outputs, in_flight)

    def timed(prompts, outputs, in_flight) -> float:
        """Best seconds of the requests, after an untimed two-token run of the same prompts (an engine that
        compiles per shape, as vLLM does with torch.compile, compiles there)."""
        run(prompts, [min(2, n) for n in outputs], in_flight)
        return best(lambda: run(prompts, outputs, in_flight), repeats)

    figures: dict = {}
    b1, n = spec["b1"], spec["b1_tokens"]
    figures["greedy"] = run([b1], [n], 1)[0]
    figures["b1"] = n / timed([b1], [n], 1)
    conc, n = spec["conc"], spec["conc_tokens"]
    figures["conc"] = len(conc) * n / timed(conc, [n] * len(conc), len(conc))
    mixed, outs = spec["mixed"], spec["mixed_out"]
    figures["mixed16"] = sum(outs) / timed(mixed, outs, 16)
    if engine.caches_prefixes or len(mixed) <= 16:  # HF's static batches of all 64: not what anyone runs
        figures["mixed_all"] = sum(outs) / timed(mixed, outs, len(mixed))
    prefix, first, second = spec["ttft"][0]
    run([prefix[::-1] + first], [1], 1)  # warm-up at the same length, nothing of it reused below
    run([prefix[::-1] + second], [1], 1, reuse=True)
    cold, cached = [], []
    for prefix, first, second in spec["ttft"]:
        start = time.perf_counter()
        run([prefix + first], [1], 1)
        cold.append(time.perf_counter() - start)
        if engine.caches_prefixes:
            start = time.perf_counter()
            run([prefix + second], [1], 1, reuse=True)
            cached.append(time.perf_counter() - start)
    figures["ttft_cold"] = min(cold)
    if cached:
        figures["ttft_cached"] = min(cached)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=sorted(ENGINES))
    parser.add_argument("--model", required=True, help="the HF checkpoint folder")
    parser.add_argument("--gguf", default=None, help="llama.cpp: the same weights as GGUF")
    parser.add_argument("--llama-server", default=None, help="llama.cpp: the llama-server binary")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    parser.add_argument("--spec", type=Path, required=True, help="the workloads (JSON, from bench_peers.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    engine = ENGINES[args.engine](args)
    try:
        figures = measure(engine, json.loads(args.spec.read_text()), args.repeats)
    finally:
        engine.close()
    args.out.write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
