"""The Ray engine's pure parts: actor planning, option checks, error unwrapping, the scoring actor's
row handling (run in-process on a tiny model), and Ray's console lines routed to our Reporter."""

from __future__ import annotations

import io
import pickle

import pyarrow as pa
import pytest

from rerank_cli.config import build_config
from rerank_cli.engines.ray.cluster import plan_actors
from rerank_cli.engines.ray.run import _ReporterLines, check_options
from rerank_cli.errors import ConfigError, InputError, PairTooLargeError, WorkerError
from rerank_cli.progress import Reporter


def cfg(**flags):
    return build_config({"input": "pairs.parquet", "model": "m", "engine": "ray", **flags})


# --- plan_actors -----------------------------------------------------------------------------------


def test_one_actor_per_gpu_each_seeing_its_own_gpu():
    plan = plan_actors(32, 4, [16, 16], cfg())
    assert (plan.actors, plan.device, plan.num_gpus, plan.threads) == (4, "cuda:0", 1.0, None)
    assert plan_actors(32, 4, [16, 16], cfg(ray_workers=2)).actors == 2
    big = plan_actors(32, 4, [16, 16], cfg(gpus_per_worker=2))
    assert (big.actors, big.num_gpus) == (2, 2.0)


def test_cpu_actors_one_per_node_using_its_cores():
    plan = plan_actors(2, 0, [2], cfg())
    assert (plan.actors, plan.device, plan.num_cpus, plan.threads) == (1, "cpu", 1.0, 2)
    plan = plan_actors(24, 0, [8, 8, 8], cfg())
    assert (plan.actors, plan.threads) == (3, 8)
    assert plan_actors(24, 0, [8, 8, 8], cfg(ray_workers=6)).threads == 4


def test_cpu_actors_leave_a_cpu_for_reading():
    with pytest.raises(ConfigError, match="2 CPU scoring actors need 2 CPUs plus one for reading.*has 2"):
        plan_actors(2, 0, [2], cfg(ray_workers=2))
    tiny = plan_actors(1, 0, [1], cfg())
    assert (tiny.actors, tiny.num_cpus) == (1, 0.5)


def test_device_cpu_forces_cpu_actors_on_a_gpu_cluster():
    assert plan_actors(16, 2, [16], cfg(devices="cpu")).device == "cpu"


# --- check_options -----------------------------------------------------------------------------------


def test_every_unsupported_option_is_named_at_once(tmp_path):
    bad = cfg(input="-", output="out.jsonl", output_dir=str(tmp_path / "d"), on_bad_row="skip",
              devices="cuda:0")
    with pytest.raises(ConfigError) as err:
        check_options(bad)
    text = str(err.value)
    for part in ("not stdin", "--device/--devices pick local devices", "not both", "--on-bad-row skip needs"):
        assert part in text


def test_missing_input_and_unreadable_format(tmp_path):
    with pytest.raises(InputError, match="nope.parquet: no such file"):
        check_options(cfg(input=str(tmp_path / "nope.parquet")))
    with pytest.raises(ConfigError, match="unknown input format 'arrow'"):
        check_options(cfg(input=str(tmp_path / "x.arrow")))


def test_output_dir_must_be_empty_unless_overwrite(tmp_path, pairs_parquet):
    out = tmp_path / "scored"
    out.mkdir()
    (out / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(Exception, match="folder is not empty; pass --overwrite"):
        check_options(cfg(input=str(pairs_parquet), output_dir=str(out)))
    check_options(cfg(input=str(pairs_parquet), output_dir=str(out), overwrite=True))


def test_output_dir_needs_the_ray_engine():
    with pytest.raises(ConfigError, match="--output-dir works with --engine ray"):
        build_config({"input": "p.parquet", "model": "m", "output_dir": "d"})


# --- errors crossing from actors -----------------------------------------------------------------


def test_rerank_errors_survive_pickling_with_their_fields():
    err = pickle.loads(pickle.dumps(InputError("pairs.parquet", "'query' is null", row=7)))
    assert (type(err), str(err), err.row, err.exit_code) == (InputError, "pairs.parquet: row 7: 'query' is null", 7, 2)


def test_ray_wrappers_are_unwrapped_to_our_error():
    ray = pytest.importorskip("ray")
    from rerank_cli.engines.ray.run import user_error_in

    original = PairTooLargeError("row 4 (512 tokens) does not fit in memory on cpu even alone")
    wrapped = ray.exceptions.RayTaskError("submit", "Traceback ...long...", original).as_instanceof_cause()
    assert isinstance(wrapped, PairTooLargeError) and "does not fit" not in str(wrapped)  # Ray's text
    found = user_error_in(ray, wrapped, cfg())
    assert found is original and str(found).startswith("row 4")


def test_unreadable_input_and_dead_actors_become_user_errors():
    ray = pytest.importorskip("ray")
    from rerank_cli.engines.ray.run import user_error_in

    try:
        try:
            raise pa.ArrowInvalid("JSON parse error: Missing a name for object member. in row 3")
        except pa.ArrowInvalid as exc:
            raise RuntimeError("read task failed") from exc
    except RuntimeError as exc:
        found = user_error_in(ray, exc, cfg())
    assert isinstance(found, InputError)
    assert str(found).startswith("pairs.parquet: cannot be read as parquet (JSON parse error")
    assert isinstance(user_error_in(ray, ray.exceptions.ActorDiedError(), cfg()), WorkerError)
    assert user_error_in(ray, ValueError("a bug"), cfg()) is None


# --- the scoring actor, in-process -----------------------------------------------------------------


class _Recorder:
    """Stands in for the RunLog actor handle: records the calls the scorer sends it."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        recorder = self

        class _Method:
            def remote(self, *args):
                recorder.calls.append((name, args))

        return _Method()


def test_score_window_scores_like_the_reranker_and_leaves_null_rows_unscored(ce_model):
    from rerank_cli.engines.ray.actor import ScoreWindow
    from rerank_cli.reranker import Reranker

    config = cfg(model=ce_model, dtype="fp32")
    log = _Recorder()
    actor = ScoreWindow(config, "cpu", 1, log)
    table = pa.table({"id": [1, 2, 3, 4], "query": ["rust", "iron", None, "oxide"],
                      "passage": ["a language", "a metal", "orphan", "red"]})
    scored = actor(table)
    assert scored.schema.names == ["id", "query", "passage", "score"]
    assert scored.schema.field("score").type == pa.float32()
    want = Reranker.from_config(config, "cpu").score_columns(["rust", "iron", "oxide"],
                                                               ["a language", "a metal", "red"])
    got = scored["score"].to_pylist()
    assert got[2] is None
    assert [got[0], got[1], got[3]] == pytest.approx(want.tolist(), abs=1e-6)
    names = [name for name, _ in log.calls]
    assert names[0] == "hello" and "progress" in names
    assert sum(args[0] for name, args in log.calls if name == "progress") == 3


def test_score_window_raises_on_null_rows_when_there_is_no_driver_to_number_them(ce_model):
    from rerank_cli.engines.ray.actor import ScoreWindow

    actor = ScoreWindow(cfg(model=ce_model), "cpu", 1, _Recorder(), raise_on_bad=True)
    with pytest.raises(InputError, match="'passage' is null in a row"):
        actor(pa.table({"query": ["q"], "passage": pa.array([None], pa.string())}))


def test_score_window_checks_each_windows_columns(ce_model):
    # Folders and object-store inputs are not read before Ray starts: each window's columns are checked.
    from rerank_cli.engines.ray.actor import ScoreWindow

    actor = ScoreWindow(cfg(model=ce_model), "cpu", 1, _Recorder())
    with pytest.raises(InputError, match="missing column 'passage'"):
        actor(pa.table({"query": ["q"], "psg": ["p"]}))
    with pytest.raises(InputError, match="column 'query' holds int64, not strings"):
        actor(pa.table({"query": [5], "passage": ["p"]}))


def test_kill_switch_fires_once_per_marker(tmp_path):
    from rerank_cli.engines.ray.actor import _claim

    marker = str(tmp_path / "kill")
    assert _claim(marker) is True
    assert _claim(marker) is False


# --- Ray's console output ----------------------------------------------------------------------------


def test_ray_console_lines_go_to_the_reporter_without_colour():
    err = io.StringIO()
    lines = _ReporterLines(Reporter(stream=err))
    lines.write("\x1b[33m(raylet)\x1b[0m A worker died")
    assert err.getvalue() == ""  # half a line waits for its end
    lines.write(" unexpectedly.\n\n")
    assert err.getvalue() == "rerank: (raylet) A worker died unexpectedly.\n"
    quiet = io.StringIO()
    _ReporterLines(Reporter(quiet=True, stream=quiet)).write("(raylet) noise\n")
    assert quiet.getvalue() == ""


def test_unreadable_local_input_is_explained_by_our_own_reader(tmp_path):
    from rerank_cli.engines.ray.io import explain_read_error

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "passage": "b"}\n{"query": "a", "passage": \n')
    err = explain_read_error(cfg(input=str(bad)), ValueError("Extra data: line 2 column 1 (char 31)"))
    assert str(err) == f"{bad}:2: malformed JSON (Expecting value at column 1)"


# --- SIGTERM ---------------------------------------------------------------------------------------


def test_ray_init_does_not_take_sigterm_from_the_cli():
    """ray.init makes SIGTERM sys.exit(15); the session puts back the handler cli.main installed, so
    SIGTERM still stops the run like Ctrl-C (cluster shut down, one line, exit 143)."""
    import signal
    import sys

    from rerank_cli.engines.ray.cluster import ray_session

    class FakeRay:
        shut = False

        def is_initialized(self):
            return False

        def init(self, **options):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does

        def shutdown(self):
            self.shut = True

    def ours(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, ours)
    try:
        ray = FakeRay()
        with ray_session(ray, cfg(), Reporter(quiet=True)):
            assert signal.getsignal(signal.SIGTERM) is ours
        assert ray.shut
    finally:
        signal.signal(signal.SIGTERM, before)
