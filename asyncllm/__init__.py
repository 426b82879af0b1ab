"""asyncllm: an LLM inference engine that lives inside your Python web app."""
from asyncllm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from asyncllm.config import EngineArgs
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.errors import (
    EngineDeadError,
    EngineOverloadedError,
    EngineShutdownError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
)
from asyncllm.llm import LLM
from asyncllm.lora.request import LoRARequest
from asyncllm.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from asyncllm.pooling.config import PoolerConfig
from asyncllm.pooling_params import PoolingParams
from asyncllm.sampling.structured import GrammarError, StructuredOutputs
from asyncllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine", "LLM", "EngineArgs", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob",
    "EngineDeadError", "EngineOverloadedError", "EngineShutdownError", "InvalidRequestError", "PromptTooLongError",
    "RequestFailedError", "StructuredOutputs", "GrammarError", "PoolingParams", "PoolerConfig", "EmbeddingOutput",
    "EmbeddingRequestOutput", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "LoRARequest", "__version__",
]
