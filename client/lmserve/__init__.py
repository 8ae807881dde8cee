"""lmserve: the thin client of the lmserve daemon (Hugging Face causal LMs over gRPC).

``Client`` makes blocking calls and ``AsyncClient`` awaits them; both return frozen
dataclasses (``GenerationResult``, ``StreamChunk``, ``ModelInfo``) and raise
``LmserveError`` subclasses mapped from the gRPC status codes. Needs only grpcio and
protobuf::

    from lmserve import Client

    with Client("127.0.0.1:50051") as client:
        result = client.generate("Once upon a time", max_new_tokens=32)
        print(result.text, result.finish_reason, result.batch_size)
"""

from lmserve.aio import AsyncClient
from lmserve.client import USE_CLIENT_DEFAULT, Client
from lmserve.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LmserveError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RequestCancelledError,
    RequestTooLargeError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from lmserve.structured import (
    ChatMessage,
    Choice,
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
    StructuredOutput,
)
from lmserve.types import (
    FinishReason,
    GenerateOptions,
    GenerationResult,
    ModelInfo,
    Prompt,
    StreamChunk,
    TokenLogprob,
)

__version__ = "0.1.0"

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncClient",
    "ChatMessage",
    "Choice",
    "Client",
    "DeadlineExceededError",
    "FinishReason",
    "GenerateOptions",
    "GenerationResult",
    "Grammar",
    "InternalError",
    "InvalidArgumentError",
    "JsonObject",
    "JsonSchema",
    "LmserveError",
    "ModelInfo",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "Prompt",
    "Regex",
    "RequestCancelledError",
    "RequestTooLargeError",
    "StreamChunk",
    "StructuredOutput",
    "TokenLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "__version__",
    "from_rpc_error",
]
