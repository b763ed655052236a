"""The errors raysft raises for things a user can fix. The CLI prints them without a traceback (exit 2)."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more problems in a config, each naming its dotted key (or file:line)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"{len(problems)} problem(s){where}:\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self) -> tuple[type, tuple[list[str], str | None]]:
        # Raised on a Ray worker, it is pickled back to the driver: rebuild it from its parts.
        return (type(self), (self.problems, self.source))


class DataError(ValueError):
    """A problem in the input data; the message starts with where it is (``file:LINE: ...``)."""


class RunError(RuntimeError):
    """A run that cannot start or go on for a reason outside the config's types: the cluster cannot hold
    the workers, storage is not writable, a resume does not match its run. The message says what to do."""


class RunInterrupted(Exception):
    """A run (or sweep) stopped by SIGINT or SIGTERM, its state saved for --resume. The message says where it
    stopped; the command line adds the command that resumes it and exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int | None = None, stopped: bool = True):
        self.signum = signum
        self.stopped = stopped
        """False when the workers did not stop in time: Ray calls may still be running on another thread."""
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, int | None, bool]]:
        return (type(self), (str(self), self.signum, self.stopped))


USER_ERRORS = (ConfigError, DataError, RunError)
"""What the command line reports as one message (exit 2) instead of a traceback."""
