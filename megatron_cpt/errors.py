"""User-facing errors: one line that names the file/line/field, never a deep traceback.

Library code raises :class:`UserError` for anything the user can fix (bad input, bad flags,
mismatched checkpoints). CLIs wrap their ``main`` with :func:`megatron_cpt.cli.run` which prints
``error: <message>`` and exits 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or configuration, reported as one line."""


class BadInputError(UserError):
    """A bad record in an input file; the message starts with ``file:line:``."""

    def __init__(self, path: str, line: int, problem: str, reason: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem
        self.reason = reason  # short machine-readable class, used as the skip-counter key
