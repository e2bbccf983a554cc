"""`create_app`: the FastAPI application serving one `InferenceEngine` over HTTP.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (OpenAI), `POST /v1/messages` and
`POST /v1/messages/count_tokens` (Anthropic), `GET /v1/models` and `GET /v1/models/{id}` (OpenAI's shapes, or
Anthropic's when the request carries an `anthropic-version` header), vLLM's `POST /tokenize`,
`POST /detokenize` and `GET /tokenizer_info` (what lm-evaluation-harness's remote tokenizer reads), `GET /version`, `GET|HEAD /health` (200 while the engine loop runs,
else 503), `GET /stats` (the engine's `get_stats()`), `GET /metrics` (Prometheus text).

The server answers to the names in `served_model_names` (the first is reported in responses); a request
naming another model is a 404, as in vLLM. A request body over `max_request_bytes` is a 413 before it is
read (`BodyLimitMiddleware`). The prompt is rendered and tokenised in a worker thread, so one large request
or slow chat template never stalls the event loop (health checks, streams of other requests).

Every error a client can see is in the error shape of the protocol its path belongs to (`/v1/messages...`
is Anthropic, everything else OpenAI): FastAPI's validation errors (answered 400, not 422, as both
APIs do), HTTP errors such as 404, refused API keys (401), overload (429 / Anthropic 529, with
`retry-after`) and unexpected failures (500); the OpenAPI schema documents those 400s. The app holds no module-level state: everything lives in
the closure of `create_app`, and the lifespan shuts the engine down when the server stops.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from astrai.serve.anthropic_builder import AnthropicResponseBuilder
from astrai.serve.anthropic_schema import CountTokensRequest, MessagesRequest
from astrai.serve.auth import APIKeyMiddleware
from astrai.serve.builder import TEMPLATE_TIME_LIMIT_S, ResponseBuilder, check_chars
from astrai.serve.completions_builder import CompletionsResponseBuilder
from astrai.serve.completions_schema import CompletionRequest, DetokenizeRequest, TokenizeRequest
from astrai.serve.errors import ANTHROPIC_ERRORS, OPENAI_ERRORS, APIError
from astrai.serve.handler import ProtocolHandler
from astrai.serve.limits import BodyLimitMiddleware, default_max_request_bytes
from astrai.serve.metrics import CONTENT_TYPE, render_metrics
from astrai.serve.openai_builder import OpenAIResponseBuilder
from astrai.serve.openai_schema import ChatCompletionRequest

if TYPE_CHECKING:
    from astrai.inference import InferenceEngine

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "1"  # seconds a client should wait after an overload answer
MAX_DESCRIBED_ERRORS = 5


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for a request body that failed to parse or validate.

    The message lists the failing paths (e.g. `messages.0.content.list[TextBlock].0.type`, where pydantic
    names the union member tried); `param` is the top-level field at fault.
    """
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", errors[0]["msg"])
        return f"the request body is not valid JSON: {reason}", None
    described = []
    for error in errors[:MAX_DESCRIBED_ERRORS]:
        path = ".".join(str(part) for part in error["loc"][1:])  # loc[0] is "body"
        described.append(
            f"{path}: {error['msg']}" if path else f"the request body must be a JSON object: {error['msg']}"
        )
    first_loc = errors[0]["loc"] if errors else ()
    return "; ".join(described) or "invalid request", (str(first_loc[1]) if len(first_loc) > 1 else None)


def create_app(
    engine: InferenceEngine,
    *,
    api_key: str | None = None,
    max_queue: int | None = None,
    model_name: str | None = None,
    served_model_names: Sequence[str] | None = None,
    max_request_bytes: int | None = None,
    template_time_limit: float = TEMPLATE_TIME_LIMIT_S,
) -> FastAPI:
    """A FastAPI app serving `engine`; see the module docstring.

    api_key: when set, every endpoint but `/health` requires it (`Authorization: Bearer` or `x-api-key`).
    max_queue: when set, a request that would leave more than this many requests waiting in the engine is
        refused with 429 / 529 (the engine's own `max_queue` is enforced either way).
    served_model_names: the model names requests may ask for; the first is reported in responses and all
        are listed by `/v1/models` (default: `[model_name]`, and `model_name` defaults to `engine.model_name`).
    max_request_bytes: the largest request body accepted (default: `default_max_request_bytes` of the
        engine's context length).
    template_time_limit: seconds one request's chat template may take to render before it is refused (400).
    """
    if max_queue is not None and max_queue < 1:
        raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
    names = list(served_model_names or [model_name or engine.model_name])
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"served_model_names must be non-empty strings, got {names!r}")
    name = names[0]
    max_request_bytes = max_request_bytes or default_max_request_bytes(engine.max_seq_len)
    openai_builder = OpenAIResponseBuilder(name, template_time_limit=template_time_limit)
    anthropic_builder = AnthropicResponseBuilder(name, template_time_limit=template_time_limit)
    completions_builder = CompletionsResponseBuilder(name, template_time_limit=template_time_limit)
    started = time.time()

    def builder_for(path: str) -> ResponseBuilder:
        return anthropic_builder if path.startswith("/v1/messages") else openai_builder

    def error_response(
        path: str, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        wire_status, body = builder_for(path).error_body(status, message, param)
        if status == 429:
            headers = {**(headers or {}), "retry-after": RETRY_AFTER_S}
        return JSONResponse(body, status_code=wire_status, headers=headers)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested not in names:
            raise APIError(404, f"The model `{requested}` does not exist.", "model")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)  # joins the scheduler thread; keep the event loop free

    app = FastAPI(
        title="AstrAI",
        summary="OpenAI- and Anthropic-compatible LLM server",
        lifespan=lifespan,
        strict_content_type=False,  # a body without Content-Type is read as JSON (curl, simple clients)
    )
    app.state.engine = engine
    app.openapi = lambda: _openapi_with_400s(app)  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(request.url.path, exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation_error(exc)
        return error_response(request.url.path, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")

    if api_key is not None:
        app.add_middleware(
            APIKeyMiddleware,
            api_key=api_key,
            reject=lambda path: error_response(path, 401, "invalid or missing API key"),
        )
    app.add_middleware(  # outermost: an oversized body is refused before anything else looks at it
        BodyLimitMiddleware,
        max_bytes=max_request_bytes,
        reject=lambda path, message: error_response(path, 413, message),
    )

    @app.post("/v1/chat/completions", response_model=None, responses=OPENAI_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        handler = ProtocolHandler(body, engine, openai_builder, http_request=request, max_queue=max_queue)
        return await handler.handle()

    @app.post("/v1/completions", response_model=None, responses=OPENAI_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        handler = ProtocolHandler(body, engine, completions_builder, http_request=request, max_queue=max_queue)
        return await handler.handle()

    def tokenize_body(body: TokenizeRequest) -> dict[str, Any]:
        tokenizer = engine.tokenizer
        if body.messages is not None:
            messages = openai_builder.chat_messages(body.messages)
            tokens = openai_builder.encode_prompt(engine, messages, add_generation_prompt=body.add_generation_prompt)
            bos = getattr(tokenizer, "bos_id", None)
            if body.add_special_tokens and bos is not None and tokens[:1] != [bos]:  # the template may have written it
                tokens = [bos, *tokens]
        else:
            check_chars(len(body.prompt or ""), engine.max_seq_len, "prompt")
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = list(tokenizer.encode(body.prompt, add_special_tokens=add_special))
        strs = [tokenizer.decode([t], skip_special_tokens=False) for t in tokens] if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": engine.max_seq_len, "tokens": tokens, "token_strs": strs}

    @app.post("/tokenize", responses=OPENAI_ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        return await asyncio.to_thread(tokenize_body, body)

    @app.post("/detokenize", responses=OPENAI_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model)
        bad = [t for t in body.tokens if t >= engine.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:8]} are not below the vocabulary size {engine.vocab_size}", "tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer = engine.tokenizer
        template = getattr(tokenizer, "chat_template", None)
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": getattr(tokenizer, "unk_token", None),
            "chat_template": getattr(template, "template_str", template),
            "model_max_length": engine.max_seq_len,
            "vocab_size": engine.vocab_size,
        }

    @app.post("/v1/messages", response_model=None, responses=ANTHROPIC_ERRORS)
    async def messages(body: MessagesRequest, request: Request) -> Any:
        check_model(body.model)
        handler = ProtocolHandler(body, engine, anthropic_builder, http_request=request, max_queue=max_queue)
        return await handler.handle()

    @app.post("/v1/messages/count_tokens", responses=ANTHROPIC_ERRORS)
    async def count_tokens(body: CountTokensRequest) -> dict[str, int]:
        check_model(body.model)
        prompt_ids = await asyncio.to_thread(
            anthropic_builder.encode_prompt, engine, anthropic_builder.chat_messages(body)
        )
        return {"input_tokens": len(prompt_ids)}

    def model_card(served: str, anthropic: bool) -> dict[str, Any]:
        if anthropic:
            created_at = datetime.fromtimestamp(started, UTC).isoformat().replace("+00:00", "Z")
            return {
                "type": "model",
                "id": served,
                "display_name": served,
                "created_at": created_at,
                "lifecycle": "active",
                "max_input_tokens": engine.max_seq_len,
            }
        return {"id": served, "object": "model", "created": int(started), "owned_by": "astrai"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        if "anthropic-version" in request.headers:
            entries = [model_card(served, anthropic=True) for served in names]
            return {"data": entries, "has_more": False, "first_id": names[0], "last_id": names[-1]}
        return {"object": "list", "data": [model_card(served, anthropic=False) for served in names]}

    @app.get("/v1/models/{model_id:path}", responses=OPENAI_ERRORS)
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        check_model(model_id)
        return model_card(model_id, anthropic="anthropic-version" in request.headers)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": importlib.metadata.version("astrai-serve")}

    @app.get("/health", response_model=None)
    @app.head("/health", response_model=None, include_in_schema=False)  # load balancers probe with HEAD
    async def health() -> Response | dict[str, Any]:
        if engine.is_alive():
            return {"status": "ok", "model_loaded": True}
        return JSONResponse(
            {"status": "unavailable", "model_loaded": True, "detail": "the engine loop is not running"},
            status_code=503,
        )

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.get_stats()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine.get_stats(), name), media_type=CONTENT_TYPE)

    return app


def _openapi_with_400s(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 it documents for every body: this server answers those with 400."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema
