"""Part 3 of `make gpu-check`: the summary table, the targets, and the JSON and Markdown reports.

MFU = 2 x non-embedding parameters x real tokens / seconds / the GPU's dense bf16 peak: the vendor's
datasheet figure (989 TFLOP/s for an H100 or H200 SXM), and beside it the bf16 matmul rate measured on
the card in the same run. rerank computes its last layer for one position only, so the work it does
is a little under what this counts; the peers do all of it.
"""

from __future__ import annotations

import json
from pathlib import Path

SECTIONS = ("mode", "environment", "imports", "pytest", "models", "data", "benchmarks", "probe", "cli", "summary",
            "targets", "parity", "steps", "notes")
WORKLOADS = {"ce": "bge-reranker-v2-m3 shape", "llm": "Qwen3-Reranker-0.6B shape"}
NAMES = {"ours": "rerank", "st": "sentence-transformers", "card": "model-card loop"}
SHAPE_OF_STEP = {"ce-ours": "ce", "ce-st": "ce", "llm-ours": "llm", "llm-st": "llm", "llm-card": "llm"}
TARGET_SPEEDUP, TARGET_PAIRS_S, TARGET_MFU, PADDING_LIMIT = 1.5, 3000, 0.40, 0.10


def build_report(r: dict) -> dict:
    env, prep, jobs = r.get("env") or {}, r.get("prepare") or {}, r.get("jobs") or {}
    gpu = env.get("gpu") or {}
    peaks = {"spec": gpu.get("spec_bf16_flops"),
             "measured": gpu.get("measured_bf16_flops") or env.get("cpu_measured_fp32_flops")}
    report = {"schema": 1, "mode": r["mode"], "smoke": r["smoke"], "budget_s": r["budget_s"],
              "elapsed_s": r["elapsed_s"], "environment": {k: v for k, v in env.items() if k != "imports"},
              "imports": env.get("imports"), "pytest": r.get("pytest"), "models": prep.get("models"),
              "data": prep.get("pairs"), "benchmarks": {k: v for k, v in jobs.items() if k in SHAPE_OF_STEP},
              "probe": jobs.get("probe"), "cli": jobs.get("cli"), "steps": r["steps"], "peaks_flops": peaks}
    report["summary"] = summary_rows(report, peaks)
    report["targets"] = targets(report)
    report["parity"] = parity(Path(r["work"]))
    report["notes"] = notes(report)
    return report


def measurements(report: dict):
    """(step, kind, label, measurement) for each headline figure: ours default and tuned, a peer's best."""
    for step, job in (report["benchmarks"] or {}).items():
        if not job:
            continue
        kind, who = SHAPE_OF_STEP[step], job["contender"]
        for key in ("default", "tuned", "best"):
            m = job.get(key)
            if m:
                extra = {"default": " (defaults)", "tuned": f" --batch-size {m['batch']}", "best": ""}[key]
                yield step, kind, f"{NAMES[who]}{extra}, batch {m['batch']} {job.get('dtype', '')}", m


def summary_rows(report: dict, peaks: dict) -> list[dict]:
    rows, models = [], report.get("models") or {}
    st = {kind: m["pairs_per_s"] for step, kind, label, m in measurements(report) if step.endswith("-st")}
    for _, kind, label, m in measurements(report):
        flops = 2 * models.get(kind, {}).get("non_embedding_params", 0) * m["real_tokens"] / m["seconds"]
        rows.append({"workload": WORKLOADS[kind], "contender": label, "pairs": m["pairs"],
                     "pairs_per_s": m["pairs_per_s"], "tokens_per_s": m["tokens_per_s"],
                     "mfu_spec": flops / peaks["spec"] if peaks["spec"] else None,
                     "mfu_measured": flops / peaks["measured"] if peaks["measured"] else None,
                     "padding_share": m["padding_share"], "peak_memory_bytes": m.get("peak_memory_bytes"),
                     "vs_st": m["pairs_per_s"] / st[kind] if st.get(kind) else None, "note": m.get("note", ""),
                     "tokenize_share": m["tokenize_s"] / m["seconds"] if m.get("tokenize_s") is not None else None})
    return rows


def targets(report: dict) -> list[dict]:
    rows = {(r["workload"], r["contender"].split(",")[0]): r for r in report["summary"]}
    ce, llm = rows.get((WORKLOADS["ce"], "rerank (defaults)")), rows.get((WORKLOADS["llm"], "rerank (defaults)"))
    gpu = (report["environment"].get("gpu") or {}).get("name", "")
    out = [
        target("bge-m3 shape: rerank (defaults) / sentence-transformers (best batch)", f">= {TARGET_SPEEDUP}x",
               ce and ce["vs_st"], lambda v: v >= TARGET_SPEEDUP, "{:.2f}x"),
        target("bge-m3 shape: rerank pairs/s on an H200", f">= {TARGET_PAIRS_S:,}", ce and ce["pairs_per_s"],
               lambda v: v >= TARGET_PAIRS_S, "{:,.0f}", None if "H200" in gpu else f"not an H200 ({gpu or 'CPU'})"),
        target("bge-m3 shape: rerank MFU (dense bf16 spec)", f">= {TARGET_MFU:.0%}", ce and ce["mfu_spec"],
               lambda v: v >= TARGET_MFU, "{:.1%}"),
        target("Qwen3-0.6B shape: rerank MFU (dense bf16 spec)", f">= {TARGET_MFU:.0%}", llm and llm["mfu_spec"],
               lambda v: v >= TARGET_MFU, "{:.1%}"),
    ]
    for name, row in (("bge-m3", ce), ("Qwen3-0.6B", llm)):
        out.append(target(f"{name} shape: rerank padding share", f"<= {PADDING_LIMIT:.0%} (else: packed batches)",
                          row and row["padding_share"], lambda v: v <= PADDING_LIMIT, "{:.1%}"))
    if report["smoke"]:
        for t in out:
            t["met"], t["why"] = None, "smoke run: tiny shapes on the CPU, not a measurement"
    return out


def target(name: str, goal: str, value, test, fmt: str, why: str | None = None) -> dict:
    if value is None:
        return {"target": name, "goal": goal, "value": None, "shown": "-", "met": None, "why": "not measured"}
    return {"target": name, "goal": goal, "value": value, "shown": fmt.format(value),
            "met": None if why else bool(test(value)), "why": why or ""}


def parity(work: Path) -> list[dict]:
    """Scores of the same pairs by two contenders (bf16 both): correlation and largest difference."""
    import numpy as np

    out = []
    for kind, peer in (("ce", "st"), ("llm", "st"), ("llm", "card")):
        a, b = work / f"scores-ours-{kind}.npy", work / f"scores-{peer}-{kind}.npy"
        if not (a.exists() and b.exists()):
            continue
        x, y = np.load(a), np.load(b)
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        if peer == "card":  # p(yes) -> log-odds, rerank's raw score
            y = np.log(np.clip(y, 1e-12, 1)) - np.log(np.clip(1 - y, 1e-12, 1))
        ok = np.isfinite(x) & np.isfinite(y)
        corr = float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 2 and x[ok].std() and y[ok].std() else None
        out.append({"workload": WORKLOADS[kind], "peer": NAMES[peer], "pairs": int(n), "pearson": corr,
                    "max_abs_diff": float(np.abs(x[ok] - y[ok]).max()) if ok.any() else None})
    return out


def notes(report: dict) -> list[str]:
    out = ["MFU counts 2 x non-embedding parameters per real token (the attention scores and the LM head are "
           "not counted); the peak is the vendor's dense bf16 figure, the measured one the matmul rate in this run."]
    for t in report["targets"]:
        if "padding" in t["target"] and t["value"] is not None and t["value"] > PADDING_LIMIT and not report["smoke"]:
            out.append(f"{t['target']}: {t['shown']} of the tokens are padding: packed batches with "
                       "torch.nn.attention.varlen (torch >= 2.9) are the next step.")
    if not report["smoke"]:
        out.append("The device-map path ran on one GPU (a group of cuda:0 twice): hidden states moving between "
                   "GPUs under accelerate's hooks need a machine with two.")
    return out


def write_reports(report: dict, out: Path) -> None:
    """The JSON first (it holds everything); a Markdown that cannot be rendered says so and points to it."""
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    try:
        markdown = to_markdown(report)
    except Exception as exc:  # noqa: BLE001 - the figures are in the JSON; say why this view is missing
        markdown = f"# rerank gpu-check\n\nThe Markdown report failed ({exc!r}); the figures are in gpu-check.json.\n"
    (out / "gpu-check.md").write_text(markdown, encoding="utf-8")


def human(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def summary_cells(r: dict) -> list:
    return [r["workload"], r["contender"], r["pairs"], f"{r['pairs_per_s']:,.0f}", f"{r['tokens_per_s']:,.0f}",
            pct(r["mfu_spec"]), pct(r["mfu_measured"]), pct(r["padding_share"]), human(r["peak_memory_bytes"]),
            "-" if r["vs_st"] is None else f"{r['vs_st']:.2f}x", pct(r.get("tokenize_share"))]


SUMMARY_HEADER = ["workload", "contender", "pairs", "pairs/s", "tokens/s", "MFU (spec)", "MFU (measured)",
                  "padding", "peak memory", "vs ST", "tokenizing"]


def to_markdown(r: dict) -> str:
    env = r["environment"]
    gpu = env.get("gpu") or {}
    lines = ["# rerank gpu-check", "", f"**{r['mode']}**; {r['elapsed_s']:.0f} s of a {r['budget_s']} s budget.", "",
             "## Summary", ""] + table(SUMMARY_HEADER, [summary_cells(x) for x in r["summary"]])
    lines += ["", "## Targets", ""] + table(["target", "goal", "value", "met", "why"], [
        [t["target"], t["goal"], t["shown"], {True: "yes", False: "**no**", None: "-"}[t["met"]], t["why"]]
        for t in r["targets"]])
    p = r.get("pytest") or {}
    lines += ["", "## Part 1: pytest -m gpu", "", f"status: {p.get('status')}; {p.get('counts')}", ""]
    lines += table(["test", "outcome", "s", "message"], [[t["test"], t["outcome"], t["seconds"], t["message"]]
                                                          for t in p.get("tests", [])])
    lines += ["", "## Part 2: benchmarks", "", "### Models and data", ""]
    for name, m in (r.get("models") or {}).items():
        lines.append(f"- {name}: {m.get('shape')}; {m.get('params', 0):,} parameters, "
                     f"{m.get('non_embedding_params', 0):,} non-embedding; built in {m.get('build_s')} s")
    if r.get("data"):
        d = r["data"]
        lines.append(f"- pairs: {d.get('n', 0):,}; words per query {d.get('query_words')}, per passage "
                     f"{d.get('passage_words')}; tokens per pair {d.get('tokens')}")
    steps = {s["step"]: s for s in r["steps"]}
    for step in SHAPE_OF_STEP:  # every benchmark, with what became of the ones that did not run
        job = (r.get("benchmarks") or {}).get(step)
        if job is None:
            status = steps.get(step, {"status": "not run", "error": ""})
            lines += ["", f"### {step}", "", f"{status['status']}: {status['error'] or 'no result'}"]
        else:
            lines += ["", f"### {step}", "", "```", json.dumps(job, indent=1, default=str)[:6000], "```"]
    for name in ("probe", "cli"):
        lines += ["", f"### {name}", "", "```", json.dumps(r.get(name), indent=1, default=str)[:4000], "```"]
    lines += ["", "### Scores, contender against contender", ""] + table(
        ["workload", "peer", "pairs", "pearson", "max abs diff"],
        [[x["workload"], x["peer"], x["pairs"], x["pearson"], x["max_abs_diff"]] for x in r["parity"]])
    lines += ["", "## Environment", "", f"- GPU: {gpu or 'none'}", f"- python {env.get('python')}; "
              f"{env.get('versions')}", f"- imports: {r.get('imports')}"]
    lines += ["", "## Steps", ""] + table(["step", "status", "s", "error"], [
        [s["step"], s["status"], s["seconds"], s["error"]] for s in r["steps"]])
    lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def summary_table(r: dict) -> str:
    """The plain-text table printed last (the device tool returns the end of the output)."""
    widths = [26, 44, 6, 8, 10, 8, 8, 7, 9, 6, 6]
    head = ["workload", "contender", "pairs", "pairs/s", "tokens/s", "MFUspec", "MFUmeas", "pad", "peak mem",
            "vs ST", "tok%"]

    def line(cells):
        return " ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths))

    out = ["", f"== rerank gpu-check: {r['mode']} ({r['elapsed_s']:.0f} s) ==", line(head)]
    out += [line(summary_cells(x)) for x in r["summary"]] or ["(no benchmark finished)"]
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    out += ["", "targets:"] + [f"  {t['target']}: {t['shown']} (goal {t['goal']}; {verdict[t['met']]}"
                               f"{'; ' + t['why'] if t['why'] else ''})" for t in r["targets"]]
    p = r.get("pytest") or {}
    out += [f"pytest -m gpu: {p.get('status')} {p.get('counts')}"]
    failed = [t for t in p.get("tests", []) if t["outcome"] in ("failed", "error")]
    out += [f"  {t['outcome']}: {t['test']}: {t['message'][:160]}" for t in failed]
    out += ["steps: " + ", ".join(f"{s['step']} {s['status']}" for s in r["steps"])]
    return "\n".join(out)
