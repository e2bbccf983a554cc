"""`astrai generate`: generate text with a model folder, for one prompt or a JSONL file of prompts.

    astrai generate --model DIR --prompt "Once upon a time" --max-tokens 64 --temperature 0.7 --stream
    astrai generate --model DIR --chat --prompt "Hi!"                 # rendered with the chat template
    astrai generate --model DIR --input prompts.jsonl --output out.jsonl
    astrai generate --model CHECKPOINT_DIR --tokenizer TOKENIZER_DIR --prompt "Hi"  # folder without tokenizer

Batch mode reads one JSON object per line, `{"prompt": "..."}` (or `{"messages": [...]}` for a chat), submits
them all at once (the engine batches them continuously) and writes one line per input, in input order:
`{"prompt", "output", "finish_reason", "prompt_tokens", "completion_tokens"}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    """Generate text with a model folder (one prompt, or a JSONL file of prompts)."""
    parser.add_argument("--model", required=True, help="folder holding the model and its tokenizer")
    add_tokenizer_option(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--input", type=Path, help='JSONL file, one {"prompt": ...} per line')
    parser.add_argument("--output", type=Path, help="JSONL file for --input results (default: standard output)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="render prompts as a user message with the chat template")
    parser.add_argument("--stream", action="store_true", help="print the output of --prompt as it is produced")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    parser.add_argument("--dtype", default=None, help="e.g. float32, bfloat16 (default: the checkpoint's)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    add_engine_speed_options(parser)
    parser.set_defaults(run=_run)


def add_tokenizer_option(parser: argparse.ArgumentParser) -> None:
    """`--tokenizer DIR` (`astrai generate`, `astrai serve`); `tokenizer_folder` reads it."""
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="DIR",
        help="tokenizer folder, for a model folder without one such as a training checkpoint (default: --model)",
    )


def tokenizer_folder(args: argparse.Namespace) -> Path:
    """Where the tokenizer is read: --tokenizer, else --model; ValueError naming --tokenizer when that has none."""
    from astrai.tokenize.folder import TOKENIZER_FILE

    if args.tokenizer is not None:
        if not (args.tokenizer / TOKENIZER_FILE).is_file():
            raise ValueError(f"--tokenizer {args.tokenizer}: not a tokenizer folder (no {TOKENIZER_FILE})")
        return args.tokenizer
    if not (Path(args.model) / TOKENIZER_FILE).is_file():
        raise ValueError(
            f"--model {args.model} has no tokenizer ({TOKENIZER_FILE}): give its folder with --tokenizer DIR"
        )
    return Path(args.model)


def add_engine_speed_options(parser: argparse.ArgumentParser) -> None:
    """The engine's speed switches (`astrai generate`, `astrai serve`); `engine_speed_options` reads them."""
    parser.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="CPU: skip the packed weight copy (saves one weight's worth of memory, slower)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="CUDA: issue every step's kernels from Python instead of replaying recorded graphs (slower)",
    )


def engine_speed_options(args: argparse.Namespace) -> dict[str, bool]:
    """`InferenceEngine` keyword arguments of `add_engine_speed_options`' flags."""
    return dict(pack_weights=args.pack_weights, cuda_graphs=args.cuda_graphs)


def _run(args: argparse.Namespace) -> int:
    from astrai.inference.engine import InferenceEngine
    from astrai.inference.params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(f"--model {args.model}: not a folder")
    tokenizer = tokenizer_folder(args)
    records = _read_jsonl(args.input) if args.input is not None else []
    with InferenceEngine.from_pretrained(
        model_dir,
        tokenizer=tokenizer,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_queue=max(256, len(records)),  # batch mode queues every line at once
        **engine_speed_options(args),
    ) as engine:
        if args.prompt is not None:
            return _single(engine, args, params)
        return _batch(engine, args, params, records)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"--input {path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object, got {record!r}")
                records.append(record)
    return records


def _prompt_ids(engine: Any, record: dict[str, Any], chat: bool) -> list[int]:
    if "messages" in record:
        messages = record["messages"]
    elif isinstance(record.get("prompt"), str):
        if not chat:
            return engine.tokenizer.encode(record["prompt"])
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise ValueError(f"input line {record!r}: needs a string 'prompt' or a 'messages' list")
    return engine.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)


def _single(engine: Any, args: argparse.Namespace, params: Any) -> int:
    handle = engine.submit(_prompt_ids(engine, {"prompt": args.prompt}, args.chat), params)
    text = []
    for event in handle.iter_sync():
        if event.error is not None:
            print(f"\nastrai generate: generation failed: {event.error}", file=sys.stderr)
            return 1
        if args.stream:
            print(event.text, end="", flush=True)
        text.append(event.text)
    print("" if args.stream else "".join(text))
    return 0


def _batch(engine: Any, args: argparse.Namespace, params: Any, records: list[dict[str, Any]]) -> int:
    handles = [engine.submit(_prompt_ids(engine, r, args.chat), params) for r in records]
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    failed = 0
    try:
        for record, handle in zip(records, handles, strict=True):
            text, last = [], None
            for event in handle.iter_sync():
                text.append(event.text)
                last = event
            failed += last.finish_reason == "error"
            row = {
                "prompt": record.get("prompt", record.get("messages")),
                "output": "".join(text),
                "finish_reason": last.finish_reason,
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
            }
            if last.error is not None:
                row["error"] = last.error
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 1 if failed else 0
