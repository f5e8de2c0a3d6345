"""Errors that end a stage with a sentence for the user instead of a traceback."""


class StageError(RuntimeError):
    """A stage ran but its result must not be handed on (a failed quality gate, a degenerate training step).
    The message says what was measured and what to change; the command exits with status 1."""


STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped on request, a checkpoint was saved; rerunning resumes


class Stopped(StageError):
    """The stage got SIGTERM, saved a checkpoint and stopped; `posttrain` exits with STOPPED_EXIT (75)."""


class DiskFull(StageError):
    """A stage ran out of disk space while writing; nothing was marked done and the previous output stands. The
    message says which disk, how much is free, what was kept and what to do."""
