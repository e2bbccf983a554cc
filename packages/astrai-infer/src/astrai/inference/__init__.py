"""`astrai.inference`: paged KV cache with prefix reuse, continuous batching, and the `InferenceEngine`.

The serving classes the architecture document lists here (ChatMessage, ChatCompletionRequest, AnthropicMessage,
MessagesRequest, ResponseBuilder, OpenAIResponseBuilder, AnthropicResponseBuilder, ProtocolHandler, GenContext)
and `app` live in astrai-serve; they are importable from here too, loaded on first use (`astrai.parallel.lazy`):
`from astrai.inference import ChatMessage` needs astrai-serve installed, `import astrai.inference` does not.
`app` is the server of `astrai.serve.env_app`, configured by `ASTRAI_MODEL` and the other `ASTRAI_*` variables
and built on first access, so `uvicorn astrai.inference:app` serves a model folder.
"""

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
from astrai.inference.stats import SchedulerStats
from astrai.inference.stop import StopChecker
from astrai.inference.stream import FINISH_REASONS, GenerationEvent, OutputStream, TokenLogprob
from astrai.inference.task import Task, TaskStatus
from astrai.inference.task_manager import LoopStoppedError, QueueFullError, TaskManager
from astrai.parallel.lazy import lazy_exports

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
    "TokenLogprob",
    "TaskTable",
    "TemperatureStrategy",
    "TopKStrategy",
    "TopPStrategy",
    "cache_entry_shapes",
]


# Provided by astrai-serve; not in __all__, so `from astrai.inference import *` never needs it (nor loads a model).
SERVING_EXPORTS = {
    "ChatMessage": "astrai.serve",
    "ChatCompletionRequest": "astrai.serve",
    "AnthropicMessage": "astrai.serve",
    "MessagesRequest": "astrai.serve",
    "ResponseBuilder": "astrai.serve",
    "OpenAIResponseBuilder": "astrai.serve",
    "AnthropicResponseBuilder": "astrai.serve",
    "ProtocolHandler": "astrai.serve",
    "GenContext": "astrai.serve",
    "app": "astrai.serve.env_app",
}
__getattr__, _lazy_dir = lazy_exports(__name__, SERVING_EXPORTS, __all__)


def __dir__() -> list[str]:
    # Without `app`: whatever walks dir() (inspect.getmembers, help()) would otherwise load the environment's model.
    return [name for name in _lazy_dir() if name != "app"]
