"""The `rerank` command line: parse flags, call the library, translate errors once.

Heavy modules (torch, transformers, pyarrow) are imported inside commands, so `rerank --help` is fast
and works even when the heavy stack is broken. Every `RerankError` becomes `error: <one line>` on
stderr with its exit status (2, or 130 for Ctrl-C and 143 for SIGTERM, which stops a run the same
way); `RERANK_DEBUG=1` re-raises with the traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from rerank_cli.errors import ConfigError, Interrupted, OutputClosed, RerankError, Terminated

app = typer.Typer(
    name="rerank",
    help="Score (query, passage) pairs with cross-encoder and LLM rerankers, on every device you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

IO = "Input and output"
MODEL = "Model"
RUN = "Devices and batching"
RANK = "Ranking"
LONG = "Long passages"


def _batch_tokens(value: str | None) -> int | None:
    if value is None or value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--batch-tokens must be a number or 'auto' (got {value!r})") from None


@app.command()
def score(
    input: str = typer.Argument(..., help="Pair file (.jsonl, .parquet, .csv, .tsv; .gz ok), or - for stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Output file, or - for stdout (JSONL).",
                               rich_help_panel=IO),
    input_format: str | None = typer.Option(None, help="jsonl|parquet|csv|tsv (default: from extension).",
                                               rich_help_panel=IO),
    output_format: str | None = typer.Option(None, help="jsonl|parquet|csv|tsv|trec (default: from extension).",
                                                rich_help_panel=IO),
    query_col: str | None = typer.Option(None, help="Query column (default: query).", rich_help_panel=IO),
    passage_col: str | None = typer.Option(None, help="Passage column (default: passage).", rich_help_panel=IO),
    instruction_col: str | None = typer.Option(None, help="Per-row instruction column (LLM templates).",
                                                  rich_help_panel=IO),
    score_col: str | None = typer.Option(None, help="Name of the appended score column (default: score).",
                                            rich_help_panel=IO),
    on_bad_row: str | None = typer.Option(None, help="error (default) or skip bad rows into a rejects file.",
                                             rich_help_panel=IO),
    rejects: str | None = typer.Option(None, help="Rejects file (default: OUTPUT.rejects.jsonl).", rich_help_panel=IO),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file.",
                                   rich_help_panel=IO),
    model: str | None = typer.Option(None, "--model", "-m", help="Local path or hub id.",
                                        rich_help_panel=MODEL),
    preset: str | None = typer.Option(None, help="A preset from configs/ (see `rerank presets`).",
                                         rich_help_panel=MODEL),
    config: str | None = typer.Option(None, help="A TOML file of settings (flags override it).",
                                         rich_help_panel=MODEL),
    kind: str | None = typer.Option(None, help="auto|cross-encoder|llm (default: auto: from the config).",
                                       rich_help_panel=MODEL),
    template: str | None = typer.Option(None, help="LLM prompt template: bge|qwen3 (default: bge).",
                                           rich_help_panel=MODEL),
    instruction: str | None = typer.Option(None, help="Instruction for templates that take one.",
                                              rich_help_panel=MODEL),
    max_length: int | None = typer.Option(None, help="Max tokens per pair (default: 512).", rich_help_panel=MODEL),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize",
                                             help="Sigmoid of the raw score (p(yes) for LLMs).",
                                             rich_help_panel=MODEL),
    dtype: str | None = typer.Option(None, help="auto|fp32|fp16|bf16 (default: auto).", rich_help_panel=MODEL),
    share_prefix: bool | None = typer.Option(None, "--share-prefix/--no-share-prefix",
                                                help="LLM rerankers: compute a prefix that pairs share once "
                                                     "(default: on).", rich_help_panel=MODEL),
    trust_remote_code: bool | None = typer.Option(None, "--trust-remote-code", help="Allow model code.",
                                                     rich_help_panel=MODEL),
    long_passages: str | None = typer.Option(None, help="truncate (default: cut at --max-length, like the "
                                                           "peers) or window: score long passages whole, in windows.",
                                                rich_help_panel=LONG),
    window_stride: int | None = typer.Option(None, help="Tokens between window starts (default: half a window).",
                                                rich_help_panel=LONG),
    aggregate: str | None = typer.Option(None, help="A pair's score from its windows': max|first|mean|sum "
                                                       "(default: max).", rich_help_panel=LONG),
    max_windows: int | None = typer.Option(None, help="Windows per passage at most; the rest is cut and counted "
                                                         "(default: 32).", rich_help_panel=LONG),
    device: str | None = typer.Option(None, help="One device: cpu, cuda, cuda:N.", rich_help_panel=RUN),
    devices: str | None = typer.Option(None, help="Several devices: cuda:0,cuda:1 or cpu,cpu.",
                                          rich_help_panel=RUN),
    gpus_per_worker: int | None = typer.Option(None, help="GPUs per worker for big models (default: 1).",
                                                  rich_help_panel=RUN),
    batch_tokens: str | None = typer.Option(None, help="Padded tokens per batch, or auto (default: auto).",
                                               rich_help_panel=RUN),
    batch_size: int | None = typer.Option(None, help="Max pairs per batch (default: 256).", rich_help_panel=RUN),
    sort_window: int | None = typer.Option(None, help="Pairs read and length-sorted at a time (default: 4096).",
                                              rich_help_panel=RUN),
    shard_rows: int | None = typer.Option(None, help="Pairs per shard with several devices (default: 2048).",
                                             rich_help_panel=RUN),
    work_dir: str | None = typer.Option(None, help="Shard folder for resume (default: hidden, beside the output).",
                                           rich_help_panel=RUN),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, score nothing.", rich_help_panel=RUN),
    engine: str | None = typer.Option(None, help="local or ray (default: local).", rich_help_panel=RUN),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS, else local).",
                                              rich_help_panel=RUN),
    ray_workers: int | None = typer.Option(None, help="Ray scoring actors (default: one per GPU).",
                                              rich_help_panel=RUN),
    output_dir: str | None = typer.Option(None, help="Ray: write a folder of part files instead.",
                                             rich_help_panel=RUN),
    top_k: int | None = typer.Option(None, help="Keep the K best passages per query, with a rank.",
                                        rich_help_panel=RANK),
    group_col: str | None = typer.Option(None, help="Query id column for --top-k (default: qid, else the query).",
                                            rich_help_panel=RANK),
    doc_col: str | None = typer.Option(None, help="Document id column for TREC output (default: pid).",
                                          rich_help_panel=RANK),
    run_tag: str | None = typer.Option(None, help="Tag column of TREC output (default: rerank).", rich_help_panel=RANK),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
) -> None:
    """Score every (query, passage) pair of INPUT; write all input columns plus a score, in input order."""
    flags = {k: v for k, v in locals().items() if k not in ("preset", "config", "device")}
    flags["batch_tokens"] = _batch_tokens(batch_tokens)
    if device and devices:
        raise ConfigError("use --device or --devices, not both")
    if device:
        flags["devices"] = device
    for name in ("overwrite", "dry_run", "quiet"):
        flags[name] = flags[name] or None
    from rerank_cli.config import build_config
    from rerank_cli.pipeline import run
    from rerank_cli.progress import Reporter

    cfg = build_config(flags, preset, config)
    reporter = Reporter(quiet=cfg.quiet)
    summary = run(cfg, reporter)
    if summary is not None and not cfg.dry_run:
        reporter.info(summary.line())


@app.command("probe-memory")
def probe_memory(
    model: str | None = typer.Option(None, "--model", "-m", help="Local path or hub id."),
    preset: str | None = typer.Option(None, help="A preset from configs/ (see `rerank presets`)."),
    device: str | None = typer.Option(None, help="One device: cpu, cuda, cuda:N \\[cuda:0 if there is one, else cpu; "
                                                    "cuda with --estimate]."),
    devices: str | None = typer.Option(None, help="Several devices: cuda:0,cuda:1."),
    max_length: int | None = typer.Option(None, help="Max tokens per pair \\[512]."),
    dtype: str | None = typer.Option(None, help="auto|fp32|fp16|bf16 \\[auto]."),
    headroom: float = typer.Option(0.1, help="Fraction of memory to keep free."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    estimate: bool = typer.Option(False, "--estimate", help="From the model config alone: no weights, no device."),
    memory: str | None = typer.Option(None, help="Memory for --estimate, e.g. 80GiB \\[the device's, else 80GiB]."),
    kind: str | None = typer.Option(None, help="auto|cross-encoder|llm \\[auto: from the config]."),
    template: str | None = typer.Option(None, help="LLM prompt template: bge|qwen3 \\[bge]."),
    trust_remote_code: bool | None = typer.Option(None, "--trust-remote-code", help="Allow model code."),
) -> None:
    """Find the largest batch (padded tokens) each device fits, and cache it for `rerank score`."""
    if device and devices:
        raise ConfigError("use --device or --devices, not both")
    from rerank_cli.config import build_config
    from rerank_cli.memory.budget import parse_memory
    from rerank_cli.progress import Reporter

    flags = {"model": model, "max_length": max_length, "dtype": dtype, "kind": kind, "template": template,
             "trust_remote_code": trust_remote_code, "devices": device or devices}
    cfg = build_config(flags, preset)
    if not cfg.model:
        raise ConfigError("no model: pass --model PATH_OR_HUB_ID or --preset NAME")
    size = parse_memory(memory) if memory else None
    if size is not None and not estimate:
        raise ConfigError("--memory is for --estimate; a probe measures the device itself")
    from rerank_cli.engines.local.plan import resolve_devices
    from rerank_cli.memory.probe import probe_memory as probe
    from rerank_cli.memory.probe import render_table

    targets = list(cfg.devices) or (["cuda"] if estimate else resolve_devices(cfg))
    results = probe(cfg, targets, headroom, estimate, size, log=Reporter().info)
    if json_out:
        import json

        typer.echo(json.dumps([r.to_json() for r in results], indent=1))
    else:
        from rich.console import Console

        render_table(results, Console(width=None if sys.stdout.isatty() else 120))


@app.command()
def presets() -> None:
    """List the presets in configs/ with their model and kind."""
    from rerank_cli.config import list_presets, load_preset

    for name in list_presets():
        p = load_preset(name)
        typer.echo(f"{name:28} {p.get('model', ''):40} {p.get('kind', 'auto')}")


@app.command()
def rank(
    input: str = typer.Argument(..., help="Scored file (.jsonl, .parquet, .csv, .tsv; .gz ok), or - for stdin."),
    output: str = typer.Option("-", "--output", "-o", help="Output file (.trec/.run for a TREC run), or - (JSONL).",
                               rich_help_panel=IO),
    top_k: int | None = typer.Option(None, help="Keep the K best rows per query (default: all).", rich_help_panel=RANK),
    score_col: str | None = typer.Option(None, help="Score column to rank by (default: score).", rich_help_panel=RANK),
    group_col: str | None = typer.Option(None, help="Query id column (default: qid, else the query).",
                                            rich_help_panel=RANK),
    query_col: str | None = typer.Option(None, help="Query column, the group when there is no qid (default: query).",
                                            rich_help_panel=RANK),
    doc_col: str | None = typer.Option(None, help="Document id column for TREC output (default: pid).",
                                          rich_help_panel=RANK),
    run_tag: str | None = typer.Option(None, help="Tag column of TREC output (default: rerank).", rich_help_panel=RANK),
    input_format: str | None = typer.Option(None, help="jsonl|parquet|csv|tsv|arrow (default: from extension).",
                                               rich_help_panel=IO),
    output_format: str | None = typer.Option(None, help="jsonl|parquet|csv|tsv|arrow|trec (default: from extension).",
                                                rich_help_panel=IO),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file.",
                                   rich_help_panel=IO),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary on stderr."),
) -> None:
    """Rank an already scored file: per query, best score first, a 1-based rank, the top K kept."""
    flags = {**locals(), "overwrite": overwrite or None, "quiet": quiet or None}
    from rerank_cli.config import build_config
    from rerank_cli.progress import Reporter
    from rerank_cli.rank.ranking import run_rank

    cfg = build_config(flags)
    reporter = Reporter(quiet=cfg.quiet)
    summary = run_rank(cfg, log=reporter.info)
    reporter.info(summary.line())


@app.command("eval")
def eval_(
    run: str = typer.Argument(..., help="A TREC run (.trec, .run) or a scored file (.jsonl, .parquet, .csv), or -."),
    qrels: str = typer.Option(..., help="Judgements: TREC qrels (qid 0 docid rel) or a table with "
                                        "qid, docid, relevance columns."),
    baseline: str | None = typer.Option(None, help="A run to compare with (TREC or scored file)."),
    baseline_input_order: bool = typer.Option(False, "--baseline-input-order",
                                              help="Compare with RUN's input order (the first-stage ranking)."),
    per_query: bool = typer.Option(False, "--per-query", help="Also show every query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    score_col: str = typer.Option("score", help="Score column of a scored file."),
    group_col: str | None = typer.Option(None, help="Query id column of a scored file (default: qid, else the query)."),
    query_col: str = typer.Option("query", help="Query column, the group when there is no qid."),
    doc_col: str = typer.Option("pid", help="Document id column of a scored file (and of table qrels)."),
    input_format: str | None = typer.Option(None, help="RUN's format: trec|jsonl|parquet|csv|tsv|arrow."),
) -> None:
    """Evaluate a ranking against qrels: nDCG@10, MRR@10, MAP, Recall@10/100, beside a baseline."""
    from rerank_cli.rank.evaluation import evaluate_files
    from rerank_cli.rank.report import print_report
    from rerank_cli.rank.runs import RunColumns

    columns = RunColumns(score=score_col, group=group_col, doc=doc_col, query=query_col)
    report = evaluate_files(run, qrels, baseline=baseline, baseline_input_order=baseline_input_order,
                            columns=columns, run_format=input_format)
    print_report(report, per_query=per_query, as_json=as_json)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn user errors into one line and an exit status."""
    import click

    stop = _SigtermStop()
    try:
        with stop:
            status = app(args=argv, standalone_mode=False)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail(Interrupted.by(stop.cause))
    except KeyboardInterrupt as exc:
        _fail(Interrupted.by(exc, "; finished shards are kept for resume"))
    except RerankError as exc:
        _fail(exc)
    except BrokenPipeError:  # stdout closed by its reader while we printed (e.g. --dry-run | head -1)
        _fail(OutputClosed("stdout was closed by its reader"))
    else:
        if status == Interrupted.exit_code:  # Typer returns 130 for Ctrl-C (and SIGTERM) instead of raising
            _fail(Interrupted.by(stop.cause, "; no output written"))
        if isinstance(status, int) and status:
            sys.exit(status)


class _SigtermStop:
    """While a command runs, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread: the
    cleanup of Ctrl-C runs, and the run ends with one line and exit status 143. Only the first SIGTERM
    counts; more, while that cleanup runs, are ignored. `cause` remembers it (Typer turns it into 130)."""

    def __init__(self) -> None:
        self.cause: Terminated | None = None
        self.previous = None

    def _handle(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.cause = Terminated()
        raise self.cause

    def __enter__(self) -> _SigtermStop:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (an embedding caller): signals are not ours
            self.previous = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None and self.cause is None:  # after a SIGTERM, more stay ignored: we exit
            signal.signal(signal.SIGTERM, self.previous)


def _fail(exc: RerankError) -> None:
    if os.environ.get("RERANK_DEBUG") == "1":
        raise exc
    if getattr(exc, "quiet", False):  # stdout closed by its reader: stop silently, like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no "Exception ignored" at exit
    else:
        print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
