"""The errors balancebeam's commands stop with, each mapped to an exit code by `balancebeam`.

A usage error (exit 2) is a flag or argument to fix; a data error (exit 1) is something about the
data, the solution or a job's own reconciliation; both print as one line without a traceback.
"""

EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command-line flag or argument that cannot work: fix the command and run it again."""


class DataError(RuntimeError):
    """The data or a job's result cannot be trusted: nothing was published."""


class ReconciliationError(DataError):
    """A job's own counts disagree (records in != records out): nothing was published.

    `counts` holds the numbers that were compared, so a caller (or a test) can read them.
    """

    def __init__(self, message: str, counts: dict):
        super().__init__(message)
        self.counts = counts
