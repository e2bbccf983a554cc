"""astrai.serve: OpenAI- and Anthropic-compatible HTTP serving of an `astrai.inference.InferenceEngine`.

`create_app(engine)` returns the FastAPI application; `astrai serve --model DIR` runs it under uvicorn.
Stop strings are detected by the engine (`StopChecker`, re-exported here), never re-implemented here.
"""

from astrai.inference import StopChecker
from astrai.serve.anthropic_builder import AnthropicResponseBuilder
from astrai.serve.anthropic_schema import AnthropicMessage, CountTokensRequest, MessagesRequest
from astrai.serve.app import create_app
from astrai.serve.auth import APIKeyMiddleware
from astrai.serve.builder import ResponseBuilder, sse
from astrai.serve.completions_builder import CompletionsResponseBuilder
from astrai.serve.completions_schema import CompletionRequest, DetokenizeRequest, TokenizeRequest
from astrai.serve.context import ChoiceState, GenContext
from astrai.serve.errors import APIError
from astrai.serve.fields import TextBlock
from astrai.serve.handler import ProtocolHandler
from astrai.serve.metrics import render_metrics
from astrai.serve.openai_builder import OpenAIResponseBuilder
from astrai.serve.openai_schema import ChatCompletionRequest, ChatMessage, StreamOptions

__all__ = [
    "APIError",
    "APIKeyMiddleware",
    "AnthropicMessage",
    "AnthropicResponseBuilder",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChoiceState",
    "CompletionRequest",
    "CompletionsResponseBuilder",
    "CountTokensRequest",
    "DetokenizeRequest",
    "GenContext",
    "MessagesRequest",
    "OpenAIResponseBuilder",
    "ProtocolHandler",
    "ResponseBuilder",
    "StopChecker",
    "StreamOptions",
    "TextBlock",
    "TokenizeRequest",
    "create_app",
    "render_metrics",
    "sse",
]
