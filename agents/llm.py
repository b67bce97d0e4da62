"""LLM service (``llm``): the ``completion`` and ``chat`` model runner, on one of two runtimes.

``build_runner`` picks the runtime by weights and device (``settings.llm.runtime``, default ``auto``;
``agents.llm_model.resolve_runtime``):

* ``llama_cpp`` (``agents.llm_llama.LlamaRunner``): a GGUF file (the shipped SmolLM2-135M-Instruct Q4_1, or a
  configured ``.gguf``) on CPU, run by llama.cpp as it is (quantised, no conversion), with continuous batching
  over llama.cpp's multi-sequence batches. Neither torch nor transformers is imported.
* ``torch`` (``agents.llm_torch.LlmRunner``): a Hugging Face checkpoint, or any model on a CUDA device (a GGUF
  is dequantised to float32 once), with its own continuous-batching engine (``agents.llm_engine``).

Both offer the same interface (``load``, ``model_for``, ``run_batch``, ``continuous``, ``make_engine``,
``row_request``) and the same guarantees per row (see their modules). What can go wrong: the ``llama_cpp``
runtime with a Hugging Face checkpoint, or without ``llama-cpp-python``: ``ModelUnavailableError`` at ``load``.

The torch runner's names (``LlmRunner``, ``plan_groups``, ``RowStops``, ...) are still importable from here; they
are loaded on first use, so the llama_cpp agent never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agents.llm_model import resolve_runtime
from streams.settings import Settings, get_settings

if TYPE_CHECKING:
    from agents.llm_llama import LlamaRunner
    from agents.llm_torch import DEADLINE, LlmRunner, RowStops, group_key, plan_groups

__all__ = ["DEADLINE", "LlamaRunner", "LlmRunner", "RowStops", "build_runner", "group_key", "plan_groups"]

_TORCH_NAMES = frozenset({"DEADLINE", "LlmRunner", "RowStops", "group_key", "plan_groups", "WARMUP_PROMPT"})


def build_runner(settings: Settings | None = None) -> LlmRunner | LlamaRunner:
    """The ``llm`` service's runner on the runtime ``settings.llm`` resolves to; cheap: ``load()`` does the work."""
    settings = settings if settings is not None else get_settings()
    if resolve_runtime(settings.llm) == "llama_cpp":
        from agents.llm_llama import LlamaRunner

        return LlamaRunner(settings)
    from agents.llm_torch import LlmRunner

    return LlmRunner(settings)


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module("agents.llm_torch"), name)
    if name == "LlamaRunner":
        return importlib.import_module("agents.llm_llama").LlamaRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
