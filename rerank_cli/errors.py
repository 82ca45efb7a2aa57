"""The typed errors a user can see.

Everything the user can cause (bad input, a bad flag, a model that is not a reranker) is raised deep
inside as one of these, and turned into a one-line message and exit status 2 in exactly one place
(`cli.main`). Anything else is a bug and keeps its traceback. Ctrl-C and SIGTERM end as `Interrupted`.
"""

from __future__ import annotations

import signal


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class RerankError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Pickle by state, not by constructor arguments: errors cross process boundaries (spawned
        # workers, Ray actors) and subclasses such as InputError take different arguments.
        return _restore, (type(self), self.message, self.__dict__)


def _restore(cls: type[RerankError], message: str, state: dict) -> RerankError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class ConfigError(RerankError):
    """A flag, preset or config file that cannot work (all problems are reported together)."""


class InputError(RerankError):
    """Bad input data. Names the file and the 1-based line (JSONL, CSV) or row (Parquet)."""

    def __init__(self, path: str, message: str, line: int | None = None, row: int | None = None):
        where = path
        if line is not None:
            where = f"{path}:{line}"
        elif row is not None:
            where = f"{path}: row {row}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.row, self.reason = path, line, row, message


class OutputError(RerankError):
    """The output cannot be written where asked (exists, is the input, unknown format)."""


class OutputClosed(OutputError):
    """Stdout was closed by its reader (`rerank score ... | head -1`): the run stops quietly, as other
    Unix tools do, with exit status 141 (128 + SIGPIPE); nothing is printed."""

    exit_code = 141
    quiet = True


class ModelError(RerankError):
    """The model cannot be loaded, or is not a reranker this tool knows how to run."""


class DeviceError(RerankError):
    """A device or precision the machine cannot provide."""


class PairTooLargeError(RerankError):
    """A single pair does not fit in device memory even alone."""


class WorkerError(RerankError):
    """A scoring worker failed in a way retries could not fix."""


class Interrupted(RerankError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143, 128 + the signal) stopped the run; finished work is kept
    for resume. Build it with `Interrupted.by(the KeyboardInterrupt)`, which knows the signal."""

    exit_code = 130

    @classmethod
    def by(cls, cause: BaseException | None, detail: str = "") -> Interrupted:
        """The error for a run stopped by `cause`: a KeyboardInterrupt (Ctrl-C), or `Terminated` (SIGTERM)."""
        signum = getattr(cause, "signum", signal.SIGINT)
        name = "terminated by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        err = cls(name + detail)
        err.exit_code = 128 + signum
        return err


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the handler `cli.main` installs. A KeyboardInterrupt, so
    every cleanup path Ctrl-C takes (temporary output removed, finished shards kept, workers stopped,
    a Ray cluster shut down) runs for SIGTERM too."""

    signum = signal.SIGTERM
