"""`astrai data`: train a tokenizer, convert records into a store, write the built-in corpus.

    astrai data corpus --kind sft --output sft.jsonl [--limit N --seed S]
    astrai data tokenizer --input FILE_OR_DIR... [--builtin-corpus] --vocab-size N --output DIR
    astrai data build --kind text|sft|dpo|grpo --input FILE_OR_DIR... --tokenizer DIR --output DIR
                      [--store mmap|h5|json] [--field NAME=COLUMN ...] [--split NAME]

`build` reads JSON Lines, JSON, Parquet, `datasets` Arrow files and folders saved by `datasets`
(`records`), in TRL's dataset formats (`convert`). Each action prints one summary line. The work is in `corpus` and `convert`, imported (with the tokenizer) only
when an action runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

KINDS = ("text", "sft", "dpo", "grpo")  # the same as convert.BUILD_KINDS and corpus.CORPUS_KINDS
STORES = ("mmap", "h5", "json")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _corpus(args: argparse.Namespace) -> int:
    from astrai.dataset.corpus import write_corpus

    count = write_corpus(args.kind, args.output, limit=args.limit, seed=args.seed)
    print(f"astrai data corpus: {count} {args.kind} records -> {args.output}")
    return 0


def _field(value: str) -> tuple[str, str]:
    from astrai.dataset.records import parse_field

    try:
        return parse_field(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tokenizer(args: argparse.Namespace) -> int:
    from itertools import chain

    from astrai.dataset.corpus import builtin_texts
    from astrai.dataset.records import read_texts
    from astrai.tokenize import train_bpe_tokenizer

    if not args.input and not args.builtin_corpus:
        raise ValueError("nothing to train on: pass --input FILE_OR_DIR... and/or --builtin-corpus")
    sources = [read_texts(args.input)] + ([iter(builtin_texts())] if args.builtin_corpus else [])
    chars = 0

    def counted(items: Iterator[str]) -> Iterator[str]:
        nonlocal chars
        for text in items:
            chars += len(text)
            yield text

    tokenizer = train_bpe_tokenizer(counted(chain(*sources)), args.vocab_size, min_frequency=args.min_frequency)
    if chars == 0:
        raise ValueError(f"the inputs {args.input} hold no text")
    tokenizer.save_pretrained(args.output)
    print(f"astrai data tokenizer: {tokenizer.vocab_size} tokens trained on {chars:,} characters -> {args.output}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from astrai.dataset.convert import DATASET_TYPES, check_output, convert_records, save_store
    from astrai.dataset.records import map_fields, read_records
    from astrai.tokenize import AutoTokenizer

    fields = dict(args.field)
    if len(fields) != len(args.field):
        raise ValueError(f"--field names a field twice: {[f'{n}={c}' for n, c in args.field]}")
    check_output(args.output)  # before the work, not after it
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out = convert_records(args.kind, map_fields(read_records(args.input, args.split), fields), tokenizer)
    save_store(out.data, args.output, args.store)
    lengths = ""  # what the dataset's window_size has to fit
    if args.kind == "dpo":
        lengths = f", pairs of {len(out.data['chosen'][0])} tokens"
    elif args.kind == "grpo":
        lengths = (
            f", prompts of {out.data['prompts'][0].shape[1]} + responses of {out.data['responses'][0].shape[2]} tokens"
        )
    refused = ""  # records the chat template cannot render (tool calls it drops): counted, never silent
    if out.refused:
        refused = f"; {len(out.refused)} records refused (first: {out.refused[0]})"
    print(
        f"astrai data build: {out.records} records, {out.tokens:,} tokens ({out.trained:,} trained){lengths} -> "
        f"{args.output} ({args.store} store, dataset type {DATASET_TYPES[args.kind]!r}){refused}"
    )
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Prepare training data: train a tokenizer, build stores from records, write the built-in corpus."""
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(run=show_help)

    corpus = actions.add_parser(
        "corpus", help="write the built-in corpus (Python's own documentation) as JSON Lines of one kind"
    )
    corpus.add_argument("--kind", choices=KINDS, required=True, help="which records to write")
    corpus.add_argument("--output", required=True, help="the JSON Lines file to write")
    corpus.add_argument("--limit", type=_positive, default=None, help="write at most this many records")
    corpus.add_argument("--seed", type=int, default=0, help="shuffling and answer picking (default 0)")
    corpus.set_defaults(run=_corpus)

    tokenizer = actions.add_parser("tokenizer", help="train a byte-level BPE tokenizer with a ChatML chat template")
    tokenizer.add_argument(
        "--input",
        nargs="*",
        default=[],
        metavar="FILE_OR_DIR",
        help="text files; JSON Lines, JSON, Parquet or Arrow records with 'text'; folders",
    )
    tokenizer.add_argument("--builtin-corpus", action="store_true", help="also train on the built-in corpus")
    tokenizer.add_argument(
        "--vocab-size", type=_positive, required=True, help="vocabulary size, special tokens included"
    )
    tokenizer.add_argument(
        "--min-frequency", type=_positive, default=2, help="least count of a merged pair (default 2)"
    )
    tokenizer.add_argument("--output", required=True, help="folder to save the tokenizer in")
    tokenizer.set_defaults(run=_tokenizer)

    build = actions.add_parser(
        "build", help="tokenise records (TRL's dataset formats) into a store for a training type"
    )
    build.add_argument("--kind", choices=KINDS, required=True, help="record kind: text, sft, dpo or grpo")
    build.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_DIR",
        help=".jsonl, .json, .parquet, .arrow files, folders of them, folders saved by datasets' save_to_disk",
    )
    build.add_argument(
        "--field",
        type=_field,
        action="append",
        default=[],
        metavar="NAME=COLUMN",
        help="read field NAME (text, messages, prompt, completion, chosen, rejected, ...) from COLUMN; repeatable",
    )
    build.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train, or its only one)")
    build.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. from 'astrai data tokenizer')")
    build.add_argument("--output", required=True, help="folder for the store (absent or empty)")
    build.add_argument("--store", choices=STORES, default="mmap", help="storage format (default mmap)")
    build.set_defaults(run=_build)
