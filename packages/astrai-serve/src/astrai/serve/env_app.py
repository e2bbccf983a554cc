"""`environment_app()`: the `create_app` server over an engine configured by environment variables.

This module's `app`, built on first access, is what `uvicorn astrai.inference:app` (the architecture document's
`app`, re-exported lazily by `astrai.inference`) and `uvicorn astrai.serve.env_app:app` serve: for deployments
that run uvicorn (or gunicorn with uvicorn workers) themselves instead of `astrai serve`. The variables
mirror `astrai serve`'s options:

    ASTRAI_MODEL            model folder (config.json, weights, tokenizer files); required
    ASTRAI_DEVICE           torch device, e.g. cuda or cpu (default: where the model loads)
    ASTRAI_DTYPE            float32, bfloat16 or float16 (default: the checkpoint's)
    ASTRAI_MAX_BATCH_SIZE   requests decoded together (default 16)
    ASTRAI_MAX_SEQ_LEN      prompt + output limit (default: the model's max_len)
    ASTRAI_PAGE_SIZE        tokens per KV-cache page (default 16)
    ASTRAI_NUM_PAGES        KV-cache pages (default: the engine's)
    ASTRAI_MAX_QUEUE        waiting requests before answering 429 / 529 (default 256)
    ASTRAI_PACK_WEIGHTS     0 to skip the packed CPU weight copy (default 1)
    ASTRAI_CUDA_GRAPHS      0 to run CUDA steps without recorded graphs (default 1)
    ASTRAI_MODEL_NAME       name reported to clients (default: the folder's name)
    ASTRAI_API_KEY          key required on every endpoint but /health (default: none)

A missing or malformed variable is a `ValueError` naming it, raised before anything is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from astrai.serve.cli import API_KEY_ENV, DTYPES

if TYPE_CHECKING:
    from fastapi import FastAPI

MODEL_ENV = "ASTRAI_MODEL"
_INT_OPTIONS = {  # variable -> (InferenceEngine keyword, default)
    "ASTRAI_MAX_BATCH_SIZE": ("max_batch_size", 16),
    "ASTRAI_MAX_SEQ_LEN": ("max_seq_len", None),
    "ASTRAI_PAGE_SIZE": ("page_size", 16),
    "ASTRAI_NUM_PAGES": ("num_pages", None),
    "ASTRAI_MAX_QUEUE": ("max_queue", 256),
}
_BOOL_OPTIONS = {"ASTRAI_PACK_WEIGHTS": "pack_weights", "ASTRAI_CUDA_GRAPHS": "cuda_graphs"}
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def engine_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """`InferenceEngine.from_pretrained` keyword arguments (the model folder as `path`) read from `environ`."""
    model = environ.get(MODEL_ENV, "")
    if not model:
        raise ValueError(f"${MODEL_ENV} is not set: it must name the model folder to serve")
    if not Path(model).is_dir():
        raise ValueError(f"${MODEL_ENV}={model!r}: not a model folder")
    options: dict[str, Any] = {"path": model, "device": environ.get("ASTRAI_DEVICE") or None}
    dtype = environ.get("ASTRAI_DTYPE") or None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"$ASTRAI_DTYPE={dtype!r}: allowed {DTYPES}")
    options["dtype"] = dtype
    for variable, (keyword, default) in _INT_OPTIONS.items():
        value = environ.get(variable, "")
        try:
            options[keyword] = int(value) if value else default
        except ValueError:
            raise ValueError(f"${variable}={value!r}: must be an integer") from None
    for variable, keyword in _BOOL_OPTIONS.items():
        value = environ.get(variable, "1").strip().lower()
        if value not in _BOOLS:
            raise ValueError(f"${variable}={value!r}: must be one of {sorted(_BOOLS)}")
        options[keyword] = _BOOLS[value]
    if environ.get("ASTRAI_MODEL_NAME"):
        options["model_name"] = environ["ASTRAI_MODEL_NAME"]
    return options


def environment_app(environ: Mapping[str, str] | None = None) -> FastAPI:
    """Load the engine `environ` (default: `os.environ`) describes and return the app serving it."""
    from astrai.inference import InferenceEngine
    from astrai.serve.app import create_app

    environ = os.environ if environ is None else environ
    options = engine_options(environ)
    engine = InferenceEngine.from_pretrained(options.pop("path"), **options)
    return create_app(engine, api_key=environ.get(API_KEY_ENV) or None)


def __getattr__(name: str) -> Any:
    # `app` (PEP 562): built from os.environ on first access, not at import, and kept.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = globals()["app"] = environment_app()
    return app
