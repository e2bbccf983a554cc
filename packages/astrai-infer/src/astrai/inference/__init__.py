"""`astrai.inference`: paged KV cache with prefix reuse, continuous batching, and the `InferenceEngine`.

The serving classes the architecture document lists here (ChatMessage, ChatCompletionRequest, AnthropicMessage,
MessagesRequest, ResponseBuilder, OpenAIResponseBuilder, AnthropicResponseBuilder, ProtocolHandler, GenContext)
and `app` (`uvicorn astrai.inference:app`) come from astrai-serve on first access (`serve_exports`).
"""

from typing import Any

from astrai.inference.cache import (
    Allocator,
    KVCache,
    KvcacheView,
    PagePool,
    PrefixCache,
    Storage,
    TaskTable,
    cache_entry_shapes,
)
from astrai.inference.engine import InferenceEngine
from astrai.inference.executor import Executor
from astrai.inference.handle import GenerateResult, RequestHandle
from astrai.inference.params import GenerationRequest, SamplingParams
from astrai.inference.sampling import (
    GREEDY_TEMPERATURE,
    BaseSamplingStrategy,
    LogitBiasStrategy,
    PenaltyStrategy,
    SamplingPipeline,
    TemperatureStrategy,
    TopKStrategy,
    TopPStrategy,
)
from astrai.inference.scheduler import InferenceScheduler
from astrai.inference.serve_exports import SERVE_NAMES, serve_attribute
from astrai.inference.stats import SchedulerStats
from astrai.inference.stop import StopChecker
from astrai.inference.stream import FINISH_REASONS, GenerationEvent, OutputStream
from astrai.inference.task import Task, TaskStatus
from astrai.inference.task_manager import LoopStoppedError, QueueFullError, TaskManager

__all__ = [
    "FINISH_REASONS",
    "GREEDY_TEMPERATURE",
    "Allocator",
    "BaseSamplingStrategy",
    "Executor",
    "GenerateResult",
    "GenerationEvent",
    "GenerationRequest",
    "InferenceEngine",
    "InferenceScheduler",
    "KVCache",
    "KvcacheView",
    "LogitBiasStrategy",
    "LoopStoppedError",
    "OutputStream",
    "PagePool",
    "PenaltyStrategy",
    "PrefixCache",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "SamplingPipeline",
    "SchedulerStats",
    "StopChecker",
    "Storage",
    "Task",
    "TaskManager",
    "TaskStatus",
    "TaskTable",
    "TemperatureStrategy",
    "TopKStrategy",
    "TopPStrategy",
    "cache_entry_shapes",
]


def __getattr__(name: str) -> Any:
    if name in SERVE_NAMES:
        return serve_attribute(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
