"""Input and output of the Ray engine: Ray Data readers in, and either one file or part files out.

Reads Parquet, JSONL and CSV/TSV from any path pyarrow understands (local, s3://, gs://, ...) with the
local engine's column rules (every input column kept, CSV fields as strings, no `score` column yet),
cut into windows of `--sort-window` rows. Writes scored windows in input order to the local engine's
writer, where bad rows get their exact 1-based row numbers, or with Ray's writers to `--output-dir`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from rerank_cli.config import RunConfig
from rerank_cli.engines.job import added_names, check_added_columns, columns_of
from rerank_cli.engines.ray.cluster import cause_text
from rerank_cli.errors import InputError, OutputError, RerankError
from rerank_cli.io.atomic import TMP_MARK, remove_stale
from rerank_cli.io.columnar import _check_schema, _validate_batch
from rerank_cli.io.formats import detect_format, display_name
from rerank_cli.io.readers import Chunk, read_chunks
from rerank_cli.io.schema import TypeChange, conform, widen

READ_FORMATS = ("jsonl", "parquet", "csv", "tsv")
JSON_EXTENSIONS = ["json", "jsonl", "ndjson"] + [f"{e}.{z}" for e in ("json", "jsonl", "ndjson")
                                                 for z in ("gz", "bz2", "zst", "lz4")]


def read_input(ray, cfg: RunConfig):
    """A Ray Dataset of the input, checked for its columns, in windows of at most `sort_window` rows."""
    fmt = detect_format(cfg.input, cfg.input_format, READ_FORMATS, "input")
    name = display_name(cfg.input)
    try:
        if fmt == "parquet":
            dataset = ray.data.read_parquet(cfg.input)
        elif fmt == "jsonl":
            dataset = ray.data.read_json(cfg.input, file_extensions=JSON_EXTENSIONS)
        else:
            dataset = _read_csv(ray, cfg.input, "\t" if fmt == "tsv" else ",")
        # Parquet's schema is in its metadata; Ray would read a JSONL or CSV file whole to find it.
        schema = dataset.schema() if fmt == "parquet" else None
    except RerankError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise explain_read_error(cfg, exc) from None
    if schema is not None:
        _check_schema(name, schema.base_schema, columns_of(cfg))
        check_added_columns(cfg, schema.base_schema)
    # (Local files were checked before Ray started; the actors check every window's columns.)
    return dataset.repartition(target_num_rows_per_block=cfg.sort_window)


def check_first_window(cfg: RunConfig) -> None:
    """Our own reader over the first window of a local input file, before Ray starts: bad input fails
    in a second with the local engine's messages (and line numbers)."""
    if "://" in cfg.input or not os.path.isfile(cfg.input):
        return
    fmt = detect_format(cfg.input, cfg.input_format, READ_FORMATS, "input")
    chunks = read_chunks(cfg.input, columns_of(cfg), fmt=fmt, window=cfg.sort_window,
                         skip_bad=cfg.on_bad_row == "skip")
    first = next(chunks, None)
    chunks.close()
    if first is not None:
        check_added_columns(cfg, first.batch.schema)


def explain_read_error(cfg: RunConfig, exc: BaseException) -> RerankError:
    """Ray's readers say little about bad input (its JSON reader even hides pyarrow's error behind a
    fallback's); for a local file, our own reader finds the line, as the local engine would."""
    fmt = detect_format(cfg.input, cfg.input_format, READ_FORMATS, "input")
    if "://" not in cfg.input and os.path.isfile(cfg.input):
        try:
            for _ in read_chunks(cfg.input, columns_of(cfg), fmt=fmt, window=cfg.sort_window):
                pass
        except RerankError as err:
            return err
    return InputError(display_name(cfg.input), f"cannot be read as {fmt} ({cause_text(exc)})")


def _read_csv(ray, path: str, delimiter: str):
    """CSV fields stay strings, as in the local engine (no type guessing: "007" is not 7)."""
    import pyarrow.csv as pcsv

    names = _csv_header(path, delimiter)
    return ray.data.read_csv(
        path, parse_options=_parse_options(delimiter),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        file_extensions=None if delimiter == "," else ["tsv", "tsv.gz"],
    )


def _parse_options(delimiter: str):
    """As the local reader: CSV quotes fields, TSV does not (a quote in a TSV field is a character)."""
    import pyarrow.csv as pcsv

    return pcsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"')


def _csv_header(path: str, delimiter: str) -> list[str]:
    """The column names on the first line of `path` (or of the first file under it)."""
    import pyarrow.csv as pcsv
    import pyarrow.fs as pafs

    fs, where = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    if fs.get_file_info(where).type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(where, recursive=True))
                       if i.type == pafs.FileType.File and not Path(i.path).name.startswith((".", "_")))
        if not files:
            raise InputError(path, "no files in this folder")
        where = files[0]
    with fs.open_input_stream(where, compression="detect") as stream:
        reader = pcsv.open_csv(stream, parse_options=_parse_options(delimiter),
                               convert_options=pcsv.ConvertOptions(column_types={}))
        return reader.schema.names


# --- one output file, written on the driver ----------------------------------------------------------


def write_file(scored, cfg: RunConfig, writer, rejects) -> int:
    """Write the scored windows to `writer` in input order; returns the rows written.

    Rows arrive in order, so the driver counts them: a null query or passage (left unscored by the
    actor) is reported with its 1-based row in the input, as the local engine does for Parquet.
    """
    name, columns = display_name(cfg.input), columns_of(cfg)
    skip_bad = cfg.on_bad_row == "skip"
    row, written, schema = 1, 0, None
    # No prefetch: with it, each window reached us only once the next one was ready too.
    for table in scored.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        for batch in table.to_batches():
            batch, schema = _same_schema(name, batch, schema, row)
            chunk = _checked(name, batch, columns, added_names(cfg), skip_bad, row)
            rejects.add(chunk.rejects)
            writer.write(chunk.batch)
            row += batch.num_rows
            written += chunk.batch.num_rows
    return written


def _same_schema(name: str, batch: pa.RecordBatch, schema: pa.Schema | None, row: int):
    """Windows typed apart meet under the one rule (`io.schema.widen`: null takes any type, int and
    float meet as float); the writer widens what it wrote before. Columns that differ otherwise are
    an input error."""
    if schema is None or batch.schema.equals(schema):
        return batch, schema or batch.schema
    try:
        batch = batch.select(schema.names) if set(batch.schema.names) == set(schema.names) else batch
        wider = widen(schema, batch.schema)
        return conform(batch, wider), wider
    except (KeyError, TypeChange, pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise InputError(name, f"columns change from ({', '.join(f'{f.name}: {f.type}' for f in schema)}) to "
                               f"({', '.join(f'{f.name}: {f.type}' for f in batch.schema)}) near here",
                         row=row) from None


def _checked(name: str, batch: pa.RecordBatch, columns, added: list[str], skip_bad: bool, first_row: int) -> Chunk:
    """The readers' null check, with input row numbers; rejected rows are dropped from the output."""
    plain = batch.drop_columns(added)  # the score (and windows) columns the actors appended
    chunk = _validate_batch(name, plain, columns, skip_bad, first_row)
    if not chunk.rejects:
        return Chunk(batch)
    return Chunk(batch.filter(pc.is_valid(batch.column(columns.score))), chunk.rejects)


# --- part files, written by Ray's writers ----------------------------------------------------------


def check_output_dir(path: str, overwrite: bool, keep: list[str] = ()) -> None:
    """The folder may be replaced (--overwrite) only if no input (nor the rejects file) lies in it."""
    if "://" in path:
        return
    for other in keep:
        if other and other != "-" and "://" not in other:
            inside = os.path.realpath(other) + os.sep
            if inside.startswith(os.path.realpath(path) + os.sep):
                raise OutputError(f"{path}: --output-dir holds {other}, which replacing the folder would remove; "
                                  "choose another folder")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise OutputError(f"{path}: exists and is not a folder")
    if os.listdir(path) and not overwrite:
        raise OutputError(f"{path}: folder is not empty; pass --overwrite to replace it")


def write_dir(scored, cfg: RunConfig) -> int:
    """Part files in `cfg.output_dir` (their names sort in input order); returns the rows written.

    A local folder is written beside its target and renamed into place at the end, so a failed run
    leaves nothing; an object-store URI is written in place.
    """
    fmt = cfg.output_format or "parquet"
    target = cfg.output_dir
    local = "://" not in target
    stage = str(Path(target).with_name(f".{Path(target).name}{TMP_MARK}{os.getpid()}")) if local else target
    if local:
        remove_stale(Path(target))  # the staging folders of killed runs
    write = {"parquet": scored.write_parquet, "jsonl": scored.write_json, "csv": scored.write_csv}[fmt]
    try:
        write(stage)
    except BaseException:
        if local:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if local:
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(stage, target)
    return _count_rows(target, fmt)


def _count_rows(path: str, fmt: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(path, format={"jsonl": "json"}.get(fmt, fmt)).count_rows()
