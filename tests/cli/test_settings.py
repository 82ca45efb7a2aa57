"""Settings that cannot work are one line naming each problem (all at once), before any model loads.

Values of the wrong type in a --config file or a preset, column names that name nothing or clash with
each other, and a score column the ranking would overwrite.
"""

from __future__ import annotations

import json

import pytest


def _assert_refused(result, out, line: str) -> None:
    code, stdout, err = result
    assert code == 2, err
    assert err == f"error: {line}\n" and stdout == ""
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_wrong_types_in_a_config_file_are_all_named(cli, ce_model, pairs_jsonl, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('max_length = "big"\nbatch_size = 2.5\nnormalize = "yes"\ndevices = 3\nquiet = 1\n'
                   'sort_window = true\nquery_col = 7\ntop_k = [3]\nshard_rows = 100\n')
    out = tmp_path / "out.jsonl"
    _assert_refused(cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, "--config", str(cfg),
                        "--batch-tokens", "0"), out,
                    f"{cfg}: max_length must be a whole number, not the string 'big'; "
                    f"{cfg}: batch_size must be a whole number, not 2.5; "
                    f"{cfg}: normalize must be true or false, not the string 'yes'; "
                    f"{cfg}: devices must be a list of device names or a comma-separated string, not 3; "
                    f"{cfg}: quiet must be true or false, not 1; "
                    f"{cfg}: sort_window must be a whole number, not true; "
                    f"{cfg}: query_col must be a string, not 7; "
                    f"{cfg}: top_k must be a whole number, not the list [3]; "
                    "--batch-tokens must be a positive number or 'auto'")


def test_wrong_types_in_a_preset_name_the_preset(cli, ce_model, pairs_jsonl, tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.toml").write_text(f'model = "{ce_model}"\nmax_length = "512"\ndevices = ["cpu", 0]\n')
    monkeypatch.setenv("RERANK_CONFIG_DIR", str(tmp_path / "cfgs"))
    out = tmp_path / "out.jsonl"
    _assert_refused(cli("score", str(pairs_jsonl), "-o", str(out), "--preset", "mine"), out,
                    "preset 'mine': max_length must be a whole number, not the string '512'; preset 'mine': devices "
                    "must be a list of device names or a comma-separated string, not the list ['cpu', 0]")
    # a flag overrides the layer below it, but the bad value is still reported: fix the file
    _assert_refused(cli("score", str(pairs_jsonl), "-o", str(out), "--preset", "mine", "--max-length", "128",
                        "--device", "cpu"), out,
                    "preset 'mine': max_length must be a whole number, not the string '512'; preset 'mine': devices "
                    "must be a list of device names or a comma-separated string, not the list ['cpu', 0]")


def test_values_of_the_right_kind_in_other_spellings_work(cli, ce_model, pairs_jsonl, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('max_length = 256.0\nbatch_tokens = "auto"\ndevices = ["cpu"]\nnormalize = true\n')
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, "--config", str(cfg), "-q")
    assert code == 0, err
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    assert len(scores) == 120 and all(0 < s < 1 for s in scores)


def test_the_python_api_checks_types_the_same_way(ce_model, pairs_jsonl, tmp_path):
    from rerank_cli import score_file
    from rerank_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^max_length must be a whole number, not the string '512'; "
                                          r"overwrite must be true or false, not the string 'no'$"):
        score_file(str(pairs_jsonl), str(tmp_path / "o.jsonl"), model=ce_model, max_length="512", overwrite="no")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("flags, line", [
    (["--query-col", ""], "--query-col must name a column (got '')"),
    (["--passage-col", " "], "--passage-col must name a column (got ' ')"),
    (["--score-col", ""], "--score-col must name a column (got '')"),
    (["--instruction-col", "\t"], "--instruction-col must name a column (got '\\t')"),
    (["--top-k", "2", "--group-col", ""], "--group-col must name a column (got '')"),
    (["--doc-col", ""], "--doc-col must name a column (got '')"),
    (["--query-col", "passage"], "--query-col and --passage-col must differ (both are 'passage')"),
    (["--score-col", "passage"], "--passage-col and --score-col must differ (both are 'passage')"),
    (["--instruction-col", "query"], "--query-col and --instruction-col must differ (both are 'query')"),
    (["--run-tag", "my run"], "--run-tag must be one word, without spaces (got 'my run')"),
    (["--query-col", "", "--score-col", " "],
     "--query-col must name a column (got ''); --score-col must name a column (got ' ')"),
])
def test_column_names_that_name_nothing_or_clash(cli, ce_model, pairs_jsonl, tmp_path, flags, line):
    out = tmp_path / "out.jsonl"
    _assert_refused(cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, *flags), out, line)


def test_a_score_column_named_like_an_input_column_is_refused(cli, ce_model, pairs_jsonl, tmp_path):
    out = tmp_path / "out.jsonl"
    _assert_refused(cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, "--score-col", "label"), out,
                    f"{pairs_jsonl} already has a column 'label'; name the new one with --score-col")


RANK_CLASH = ("clashes with the 'rank' column the ranking writes, which would replace it; use a column of "
              "another name")


@pytest.mark.parametrize("flags, what", [
    (["--score-col", "rank", "--top-k", "2"], "--score-col 'rank'"),
    (["--score-col", "rank", "--output-format", "trec"], "--score-col 'rank'"),
    (["--top-k", "2", "--group-col", "rank"], "--group-col 'rank'"),
    (["--score-col", "rank", "--top-k", "2", "--group-col", "rank"], "--score-col and --group-col 'rank'"),
])
def test_a_ranked_score_column_named_rank_is_refused(cli, ce_model, pairs_jsonl, tmp_path, flags, what):
    out = tmp_path / "out.jsonl"
    _assert_refused(cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, *flags), out,
                    f"{what} {RANK_CLASH}")


def test_a_score_column_named_rank_is_fine_without_ranking(cli, ce_model, pairs_jsonl, tmp_path):
    out = tmp_path / "out.jsonl"
    code, _, err = cli("score", str(pairs_jsonl), "-o", str(out), "-m", ce_model, "--score-col", "rank", "-q")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 120 and all(isinstance(r["rank"], float) for r in rows)
    ranked = tmp_path / "ranked.jsonl"
    _assert_refused(cli("rank", str(out), "-o", str(ranked), "--score-col", "rank"), ranked,
                    f"--score-col 'rank' {RANK_CLASH}")
    run = tmp_path / "run.trec"
    _assert_refused(cli("rank", str(out), "-o", str(run), "--score-col", "rank"), run,
                    f"--score-col 'rank' {RANK_CLASH}")
    _assert_refused(cli("rank", str(out), "-o", str(run), "--doc-col", "rank", "--score-col", "rank"), run,
                    f"--score-col and --doc-col 'rank' {RANK_CLASH}")
