"""rerank: batch reranking of (query, passage) pairs with cross-encoder and LLM rerankers.

Public API (imported lazily so `import rerank_cli` stays cheap):
    score_file(input, output, model=..., **options) -> Summary
    Reranker(model, device=None, **options).score([(query, passage), ...]) -> list[float]
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Reranker", "score_file", "RerankError", "__version__"]

from rerank_cli.errors import RerankError


def __getattr__(name: str):
    if name == "Reranker":
        from rerank_cli.reranker import Reranker

        return Reranker
    if name == "score_file":
        from rerank_cli.pipeline import score_file

        return score_file
    raise AttributeError(name)
