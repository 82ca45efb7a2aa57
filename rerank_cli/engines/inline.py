"""One device, in this process: read a chunk, score it, write it, next. The path to read when debugging.

No shards, no work dir, no subprocess. The local engine's shard loop (`engines/local`) takes over
when a run has several devices, or must be resumable.
"""

from __future__ import annotations

import time

from rerank_cli.config import RunConfig
from rerank_cli.engines.job import (
    RejectSink,
    Summary,
    columns_of,
    describe_choices,
    finish,
    input_rows,
    open_chunks,
    open_output,
    pair_columns,
    with_scores,
)
from rerank_cli.progress import Reporter


def run_inline(cfg: RunConfig, device: str, reporter: Reporter) -> Summary:
    """One device, no subprocess: the path to read when debugging."""
    from rerank_cli.reranker import Reranker

    started = time.perf_counter()
    columns = columns_of(cfg)
    chunks = open_chunks(cfg)
    reranker = Reranker.from_config(cfg, device, log=reporter.info)
    describe_choices(reporter, device, reranker)
    summary = Summary.for_run(cfg, devices=[device], dtype=reranker.precision.name, output=cfg.output)
    reporter.start(input_rows(cfg))
    row = 1
    with RejectSink(cfg) as rejects, open_output(cfg) as writer:  # rejects kept only if the output is
        for chunk in chunks:
            rejects.add(chunk.rejects)
            q, p, inst = pair_columns(chunk, columns)
            scored = reranker.score_chunk(q, p, inst, on_batch=reporter.advance, first_row=row)
            writer.write(with_scores(chunk.batch, scored, cfg))
            row += chunk.num_rows
        reporter.stop()
    return finish(summary, reranker.stats, rejects, started)
