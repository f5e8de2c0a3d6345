"""Errors that end a stage with a sentence for the user instead of a traceback."""


class StageError(RuntimeError):
    """A stage ran but its result must not be handed on (a failed quality gate, a degenerate training step).
    The message says what was measured and what to change; the command exits with status 1."""
