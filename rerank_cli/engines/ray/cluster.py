"""Reaching Ray and sizing the scoring pool, for `--engine ray`.

Owns the connection (`--ray-address`, `$RAY_ADDRESS`, else a fresh local cluster that is shut down
after the run), its credentials (a local cluster gets a token of its own, for the run only; joining a
token-authenticated cluster without its token is one line that names the fix), what the workers
receive (this rerank_cli and the HF_*/RERANK_* settings), keeping Ray's own start-up chatter off our
terminal, and `plan_actors`: how many scoring actors, with which resources, for the cluster at hand.
Knows nothing of datasets or files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rerank_cli.config import RunConfig
from rerank_cli.errors import ConfigError
from rerank_cli.progress import Reporter

FORWARDED_ENV = ("RERANK_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cause_text(exc: BaseException) -> str:
    """The first line of what went wrong, under Ray's task wrappers (which keep it as `.cause`)."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    text = ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
AUTH_FIX = ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, or the path of a file holding it "
            "in RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head node prints it)")
AUTH_REJECTED = ("InvalidAuthToken", "Unauthenticated")


@contextlib.contextmanager
def ray_session(ray, cfg: RunConfig, reporter: Reporter):
    """Connected to Ray for the run: an address, $RAY_ADDRESS, else a new local cluster (shut down after).

    A caller that already called `ray.init` keeps its connection.
    """
    if ray.is_initialized():
        yield
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    options = dict(logging_level=logging.ERROR, log_to_driver=os.environ.get("RERANK_DEBUG") == "1")
    if address == "local":  # its workers inherit this process's environment and sys.path
        options["include_dashboard"] = False
    else:
        options["runtime_env"] = runtime_env()
        probe(address)
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if address == "local":
            stack.enter_context(own_cluster_token())
        _init(ray, address, options)
        stack.callback(ray.shutdown)
        where = "started a local Ray cluster" if address == "local" else f"connected to Ray at {address}"
        reporter.info(f"ray: {where} in {time.perf_counter() - began:.1f} s")
        yield


def _init(ray, address: str, options: dict) -> None:
    """`ray.init`, with a failure to connect (or to authenticate) turned into one line that names the fix."""
    with _fd2_captured(os.environ.get("RERANK_DEBUG") != "1") as captured, _sigterm_kept():
        try:
            ray.init(address=address, **options)
            return
        except ray.exceptions.AuthenticationError:
            rejected, cause = True, "this process has no token for it"
        except (ConnectionError, ValueError, RuntimeError) as exc:
            rejected, cause = any(s in captured() for s in AUTH_REJECTED), cause_text(exc)
    if rejected:
        raise ConfigError(f"the Ray cluster at {address!r} uses token authentication and refused this "
                          f"client ({cause}): {AUTH_FIX}") from None
    raise ConfigError(f"cannot reach the Ray cluster at {address!r}: {cause}") from None


@contextlib.contextmanager
def own_cluster_token():
    """Token authentication for the cluster this run starts, with a fresh token that lives in this
    process's environment for the run (the cluster's processes inherit it): nothing is written to
    ~/.ray, and nothing has to be set up first. An explicit RAY_AUTH_MODE is the user's choice and stays."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        yield
        return
    saved = {name: os.environ.get(name) for name in AUTH_ENV}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    _reload_auth()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_auth()


def _reload_auth() -> None:
    """Make Ray read RAY_AUTH_* again: it caches them when imported and when it first loads a token."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _sigterm_kept():
    """ray.init makes SIGTERM `sys.exit(15)`; keep the caller's handler (cli.main's stops the run as
    Ctrl-C does: the cluster shut down, no output, one line, exit 143)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an address nothing listens at (ray.init would retry it for minutes)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and friends: let Ray resolve them
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}); is "
                          "`ray start --head` running there, and is the address host:port?") from None


@contextlib.contextmanager
def _fd2_captured(capture: bool):
    """While Ray starts, its C++ core writes straight to file descriptor 2 (connection retries, the
    reason a cluster refused us); keep that off our stderr, but readable: yields a function that
    returns what was written. Python errors still raise."""
    if not capture:
        yield lambda: ""
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: _read_all(sink)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _read_all(sink) -> str:
    sink.seek(0)
    return sink.read().decode("utf-8", "replace")


def runtime_env() -> dict:
    """Ship this rerank_cli to the workers and pass on the settings that steer it (HF_*, RERANK_*, ...).

    Workers then run the driver's code even where the cluster has another rerank-cli (or none); they
    still need torch and transformers installed.
    """
    package = str(Path(__file__).resolve().parents[2])  # rerank_cli/, not this folder
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    return {"py_modules": [package], "env_vars": env}


def cluster_shape(ray) -> tuple[float, float, list[float]]:
    """Total CPUs, total GPUs and the CPUs of each live node."""
    total = ray.cluster_resources()
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return total.get("CPU", 0.0), total.get("GPU", 0.0), nodes or [total.get("CPU", 0.0)]


@dataclass(frozen=True)
class ActorPlan:
    """How many scoring actors, on what, with which Ray resources."""

    actors: int
    device: str  # "cuda:0": Ray shows each GPU actor only its own GPUs
    num_gpus: float
    num_cpus: float
    threads: int | None  # torch threads of a CPU actor

    def describe(self) -> str:
        if self.num_gpus:
            return f"ray: {self.actors} scoring actors with {self.num_gpus:g} GPU each"
        return f"ray: {self.actors} CPU scoring actor(s), {self.threads} torch threads each"


def plan_actors(cpus: float, gpus: float, node_cpus: list[float], cfg: RunConfig) -> ActorPlan:
    """One actor per GPU (or per `--gpus-per-worker` GPUs); without GPUs, one CPU actor per node.

    CPU actors always leave one CPU of the cluster free: Ray Data's read tasks need it, and without
    it the pipeline stalls forever.
    """
    cpu_only = bool(cfg.devices)  # check_options allows only cpu devices here
    if gpus >= cfg.gpus_per_worker and not cpu_only:
        actors = cfg.ray_workers or int(gpus // cfg.gpus_per_worker)
        return ActorPlan(actors, "cuda:0", float(cfg.gpus_per_worker), 1.0, None)
    actors = cfg.ray_workers or len(node_cpus)
    actor_cpus = 1.0 if cpus >= 2 else cpus / 2
    if actors * actor_cpus > cpus - actor_cpus:
        raise ConfigError(f"{actors} CPU scoring actors need {actors * actor_cpus:g} CPUs plus one for "
                          f"reading, and the Ray cluster has {cpus:g}; lower --ray-workers")
    per_node = math.ceil(actors / len(node_cpus))
    threads = max(1, int(min(node_cpus) // per_node))
    return ActorPlan(actors, "cpu", 0.0, actor_cpus, threads)
