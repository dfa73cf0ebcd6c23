"""``llmtrain serve``: an exported model behind an OpenAI-compatible HTTP API.

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(plain and server-sent events; chat through the export's chat template),
``GET /health`` and ``GET /metrics`` (Prometheus). The API shape is vLLM's and OpenAI's, so the
official ``openai`` client, LangChain and friends talk to it unchanged; the server itself is our
own: vLLM wants a GPU and its own model classes, while this one runs the
:class:`~llmtrain.runtime.model.GPT` the job trained, on CPU or GPU, with the sampling code of
``llmtrain generate`` (:mod:`llmtrain.runtime.generate`). For the same reason the request
validation is hand-written (OpenAI's error bodies, parameters that would change the output
refused rather than ignored) and so is the batching engine (continuous batching over our own
KV caches).

The modules, each one job; arrows point only downwards (no module imports one above it):

- :mod:`~llmtrain.runtime.serve.app` — the HTTP routes on FastAPI/uvicorn, the request's path
  from body to engine to response, and :func:`load_server` / :func:`serve` for the CLI.
- :mod:`~llmtrain.runtime.serve.protocol` — OpenAI's ``/v1/completions``: validation
  (:func:`~llmtrain.runtime.serve.protocol.parse_completion_request`), error bodies, response
  and stream-chunk shapes. No torch, no HTTP.
- :mod:`~llmtrain.runtime.serve.chat_protocol` — OpenAI's ``/v1/chat/completions``: messages →
  prompt ids through the chat template (:mod:`llmtrain.runtime.chat`), validation (the
  sampling parameters by protocol's helpers), ``chat.completion`` and chunk shapes.
- :mod:`~llmtrain.runtime.serve.limits` — the bounds on clients: API key, body size, header /
  body / write timeouts (uvicorn's h11 protocol with a header deadline).
- :mod:`~llmtrain.runtime.serve.engine` — continuous batching: one thread, one forward pass per
  step over every running sequence.
- :mod:`~llmtrain.runtime.serve.metrics` — the ``llmtrain_serve_*`` Prometheus series.
- :mod:`~llmtrain.runtime.serve.text` — token ids → text deltas, cut before stop strings.

This package imports torch and FastAPI: :mod:`llmtrain.cli` imports it only inside
``llmtrain serve``.
"""

from __future__ import annotations

from llmtrain.runtime.serve.app import ModelServer, load_server, serve
from llmtrain.runtime.serve.metrics import EngineStats, ServeMetrics

__all__ = ["EngineStats", "ModelServer", "ServeMetrics", "load_server", "serve"]
