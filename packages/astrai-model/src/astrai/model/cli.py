"""`astrai eval`: evaluate a model folder. One task so far, `perplexity`:

    astrai eval perplexity --model DIR --data corpus.jsonl [--tokenizer DIR] [--window 1024 --stride 512]

prints the tokens scored, the mean NLL (nats/token), the perplexity and the bits per byte, as defined in
`astrai.model.perplexity`. torch and the model code are imported inside the command, so `astrai --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def configure(parser: argparse.ArgumentParser) -> None:
    """Evaluate a model folder (perplexity and bits per byte on a text corpus)."""
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    summary = "Perplexity and bits per byte of a causal LM on a .txt file or a JSONL file of {'text': ...}."
    ppl = tasks.add_parser("perplexity", help=summary, description=summary)
    ppl.add_argument("--model", required=True, type=Path, help="model folder (ours or a Hugging Face checkpoint)")
    ppl.add_argument("--data", required=True, type=Path, help="plain-text file (one document) or .jsonl")
    ppl.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the model folder)")
    ppl.add_argument("--window", type=int, default=None, help="tokens per forward pass (default: min(max_len, 1024))")
    ppl.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: the window, no overlap; smaller: sliding window, "
        "only the new tokens of each window are scored)",
    )
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    ppl.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the checkpoint's)")
    ppl.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ppl.add_argument("--limit-bytes", type=int, default=None, help="score only the first N UTF-8 bytes of text")
    ppl.set_defaults(run=_perplexity)


def _perplexity(args: argparse.Namespace) -> int:
    import torch

    from astrai.model.automodel import AutoModel
    from astrai.model.perplexity import evaluate_perplexity, read_documents
    from astrai.model.transformer import AutoRegressiveLM
    from astrai.tokenize import AutoTokenizer

    if not args.model.is_dir():
        raise ValueError(f"--model {args.model}: not a folder")
    documents = read_documents(args.data, args.limit_bytes)  # input errors before the (slow) model load
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = AutoModel.from_pretrained(args.model, dtype=dtype, device=device)
    if not isinstance(model, AutoRegressiveLM):
        raise ValueError(f"--model {args.model}: holds a {type(model).__name__}, not a causal language model")
    result = evaluate_perplexity(
        model, tokenizer, documents, args.window, args.stride, args.batch_size, show_progress=True
    )
    print(f"model          {args.model} ({device}, {next(model.parameters()).dtype})")
    print(f"data           {args.data}: {result.n_documents:,} documents, {result.n_bytes:,} bytes")
    print(
        f"tokens         {result.n_tokens:,} in {result.n_windows:,} windows "
        f"(window {result.window}, stride {result.stride})"
    )
    print(f"tokens scored  {result.tokens_scored:,}")
    print(f"mean NLL       {result.mean_nll:.6f} nats/token")
    print(f"perplexity     {result.perplexity:.6g}")
    print(f"bits per byte  {result.bits_per_byte:.6f}")
    return 0
