"""`astrai serve`: load a model folder into an `InferenceEngine` and serve it under uvicorn.

torch, uvicorn and the engine are imported inside `run`, so `astrai --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from astrai.inference.cli import add_engine_speed_options, add_tokenizer_option, engine_speed_options, tokenizer_folder

DTYPES = ("float32", "bfloat16", "float16")
API_KEY_ENV = "ASTRAI_API_KEY"
HEADER_TIMEOUT_S = 20.0  # as Apache's RequestReadTimeout header=20
KEEP_ALIVE_TIMEOUT_S = 5.0  # uvicorn's own default


def configure(parser: argparse.ArgumentParser) -> None:
    """Serve a model over OpenAI- and Anthropic-compatible HTTP."""
    parser.add_argument("--model", required=True, help="model folder (config.json, weights, tokenizer files)")
    add_tokenizer_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: the engine's)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the engine's)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max-seq-len", type=int, default=None, help="prompt + output limit (default: model's)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    parser.add_argument("--num-pages", type=int, default=None, help="KV-cache pages (default: the engine's)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429/529")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require this key (Bearer or x-api-key) on every endpoint but /health (default: ${API_KEY_ENV})",
    )
    add_engine_speed_options(parser)
    parser.add_argument(
        "--served-model-name",
        "--model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names requests may use for the model; the first is reported in responses (default: folder name)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="largest request body accepted, else 413 (default: 64 bytes per token of context, at least 1 MiB)",
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=KEEP_ALIVE_TIMEOUT_S,
        help="seconds an idle keep-alive connection stays open (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout-header",
        type=float,
        default=HEADER_TIMEOUT_S,
        help="seconds a connection may take to send a request's headers (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not Path(args.model).is_dir():
        raise ValueError(f"--model must be a model folder, got {args.model!r}")
    tokenizer = tokenizer_folder(args)
    import torch
    import uvicorn

    from astrai.inference import InferenceEngine
    from astrai.serve.app import create_app
    from astrai.serve.server import server_config

    engine = InferenceEngine.from_pretrained(
        args.model,
        tokenizer=tokenizer,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_queue=args.max_queue,
        **engine_speed_options(args),
    )
    app = create_app(
        engine,
        api_key=args.api_key or None,
        served_model_names=args.served_model_name,
        max_request_bytes=args.max_request_bytes,
    )
    config = server_config(
        app,
        host=args.host,
        port=args.port,
        header_timeout=args.timeout_header,
        keep_alive_timeout=args.timeout_keep_alive,
        log_level=args.log_level,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after a clean shutdown (as uvicorn.run)
        uvicorn.Server(config).run()
    return 0
