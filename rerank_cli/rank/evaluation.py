"""`rerank eval`: nDCG@10, MRR@10, MAP, Recall@10 and Recall@100 of a run, beside a baseline.

The metrics come from ir-measures (https://github.com/terrierteam/ir_measures), backed by
pytrec-eval-terrier, trec_eval's own C code as a Python extension. Why this library:
- correctness: the numbers are trec_eval's, the reference every IR paper reports;
- install weight: pure-Python ir-measures plus a ~1 MB prebuilt pytrec-eval-terrier wheel (for
  CPython 3.9+ on Linux, macOS and Windows; its metadata also pulls scipy, a prebuilt wheel). The
  original pytrec_eval ships only a source package that needs a C++ build and fetches trec_eval at
  build time; ranx pulls numba/llvmlite, pandas, seaborn and ir-datasets, and compiles its metrics
  with numba on the first call, which is slow for a command line tool.
It is imported lazily (only `rerank eval` needs it), with an install hint when missing.

Which queries count: those of the qrels with at least one relevant document (relevance > 0). A judged
query missing from a run scores 0 for it; queries of a run without judgements are left out; both are
counted in the report's notes. Gains are graded as trec_eval's (linear: gain = relevance). Only the
numbers: loading runs is `runs.py`, the table and JSON are `report.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rerank_cli.errors import ConfigError, InputError
from rerank_cli.rank.runs import LoadedRun, Qrels, Run, RunColumns, load_run, read_qrels

# (label shown to users, ir-measures name)
MEASURES = (
    ("nDCG@10", "nDCG@10"),
    ("MRR@10", "RR@10"),
    ("MAP", "AP"),
    ("Recall@10", "R@10"),
    ("Recall@100", "R@100"),
)
PerQuery = dict[str, dict[str, float]]  # qid -> label -> value


def _ir_measures():
    try:
        import ir_measures
    except ImportError:
        raise ConfigError("rerank eval needs ir-measures: pip install 'rerank-cli[eval]' "
                          "(or pip install ir-measures)") from None
    return ir_measures


@dataclass
class Report:
    """Per-query values of a run (and a baseline) over one set of queries."""

    run_name: str
    qrels_name: str
    queries: list[str]
    run: PerQuery
    baseline_name: str | None = None
    baseline: PerQuery | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in MEASURES]

    def mean(self, per_query: PerQuery) -> dict[str, float]:
        n = len(self.queries)
        return {label: sum(per_query[q][label] for q in self.queries) / n for label in self.labels}

    def diff(self) -> dict[str, float]:
        run, base = self.mean(self.run), self.mean(self.baseline)
        return {label: run[label] - base[label] for label in self.labels}

    def wins(self, label: str) -> tuple[int, int, int]:
        """Queries where the run beats, ties and loses to the baseline on `label`."""
        deltas = [self.run[q][label] - self.baseline[q][label] for q in self.queries]
        eps = 1e-12
        return (sum(d > eps for d in deltas), sum(abs(d) <= eps for d in deltas), sum(d < -eps for d in deltas))

    def to_json(self, per_query: bool = False) -> dict:
        out = {"run": self.run_name, "baseline": self.baseline_name, "qrels": self.qrels_name,
               "queries": len(self.queries), "metrics": {"run": self.mean(self.run)}, "notes": self.notes}
        if self.baseline is not None:
            out["metrics"]["baseline"] = self.mean(self.baseline)
            out["metrics"]["diff"] = self.diff()
        if per_query:
            out["per_query"] = [self._query_json(q) for q in self.queries]
        return out

    def _query_json(self, qid: str) -> dict:
        row = {"qid": qid, "run": self.run[qid]}
        if self.baseline is not None:
            row["baseline"] = self.baseline[qid]
            row["diff"] = {k: self.run[qid][k] - self.baseline[qid][k] for k in self.labels}
        return row


def per_query(run: Run, qrels: Qrels, queries: list[str]) -> PerQuery:
    """Every metric of `run` for each of `queries` (0 where the run has no ranking for a query)."""
    irm = _ir_measures()
    names = {irm.parse_measure(name): label for label, name in MEASURES}
    wanted = set(queries)
    values: PerQuery = {q: dict.fromkeys(names.values(), 0.0) for q in queries}
    sub_run = {q: docs for q, docs in run.items() if q in wanted and docs}
    sub_qrels = {q: qrels[q] for q in queries}
    for metric in irm.iter_calc(list(names), sub_qrels, sub_run):
        if metric.query_id in values:
            values[metric.query_id][names[metric.measure]] = float(metric.value)
    return values


def judged_queries(qrels: Qrels, qrels_name: str) -> list[str]:
    queries = [q for q, docs in qrels.items() if any(rel > 0 for rel in docs.values())]
    if not queries:
        raise InputError(qrels_name, "no relevant judgements (no relevance above 0)")
    return queries


def coverage_notes(loaded: LoadedRun, qrels: Qrels, queries: list[str], qrels_name: str) -> list[str]:
    """What a reader should know about how a run's queries line up with the qrels."""
    run_ids = set(loaded.run)
    if not run_ids & set(qrels):
        sample_run, sample_qrels = sorted(run_ids)[:3], sorted(qrels)[:3]
        raise InputError(loaded.name, f"none of its {len(run_ids)} query ids appear in {qrels_name} "
                                      f"(run: {', '.join(sample_run)}; qrels: {', '.join(sample_qrels)}); "
                                      "pick the query id column with --group-col")
    notes = list(loaded.notes)
    missing = [q for q in queries if q not in run_ids]
    unjudged = run_ids - set(qrels)
    if missing:
        notes.append(f"{loaded.name}: {len(missing)} judged queries have no ranking and count as 0")
    if unjudged:
        notes.append(f"{loaded.name}: {len(unjudged)} queries have no judgements and are left out")
    return notes


def evaluate(run: LoadedRun, qrels: Qrels, qrels_name: str, baseline: LoadedRun | None = None) -> Report:
    """The report of `run` (and `baseline`) on the judged queries of `qrels`."""
    queries = judged_queries(qrels, qrels_name)
    notes = coverage_notes(run, qrels, queries, qrels_name)
    unanswerable = sum(1 for docs in qrels.values() if not any(rel > 0 for rel in docs.values()))
    if unanswerable:
        notes.append(f"{qrels_name}: {unanswerable} judged queries have no relevant document and are left out")
    report = Report(run.name, qrels_name, queries, per_query(run.run, qrels, queries), notes=notes)
    if baseline is not None:
        report.notes += coverage_notes(baseline, qrels, queries, qrels_name)
        report.baseline_name = baseline.name
        report.baseline = per_query(baseline.run, qrels, queries)
    return report


def evaluate_files(run: str, qrels: str, *, baseline: str | None = None, baseline_input_order: bool = False,
                   columns: RunColumns = RunColumns(), run_format: str | None = None) -> Report:
    """`rerank eval` as a function: load the files, then `evaluate`."""
    if baseline and baseline_input_order:
        raise ConfigError("use --baseline RUN or --baseline-input-order, not both")
    _ir_measures()
    judgements = read_qrels(qrels, columns.doc)
    loaded, input_order = load_run(run, columns, run_format)
    base = None
    if baseline_input_order:
        if input_order is None:
            raise ConfigError(f"{run} is a TREC run, which has no input order; "
                              "--baseline-input-order needs the scored file (JSONL, Parquet, CSV)")
        base = input_order
    elif baseline:
        base, _ = load_run(baseline, columns)
    return evaluate(loaded, judgements, qrels if qrels != "-" else "<stdin>", base)
