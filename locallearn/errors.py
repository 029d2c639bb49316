"""Errors a user can fix, and how the CLI exits on each kind.

A :class:`UserError` means the input was wrong (an unknown name, a missing file, a K that does not fit the model).
The CLI prints its message as one line and exits with the error's ``exit_code``, without a traceback. Its message
must say what was wrong *and* what to do about it.

| exit status | class | meaning |
|---|---|---|
| 2 | :class:`UserError` | usage or config: an unknown name, a bad value, a K that does not fit |
| 3 | :class:`DataError` | a dataset missing, empty, corrupt or with labels out of range |
| 4 | :class:`CheckpointError` | a checkpoint missing, damaged, or not of this run's configuration |
| 5 | :class:`NonFiniteError` | a block's loss or gradient became NaN or infinite |
| 6 | :class:`PeerFailed` | distributed run: another process died or a message timed out (``--dist.timeout_s``) |
| 128 + N | :class:`Preempted` | signal N (SIGTERM 143, SIGINT 130, SIGUSR1 138) stopped the run after a checkpoint |
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""

    exit_code = 2


class DataError(UserError):
    """A dataset that cannot be used as it is."""

    exit_code = 3


class CheckpointError(UserError):
    """A checkpoint that cannot be used."""

    exit_code = 4


class NonFiniteError(UserError):
    """Training produced a NaN or infinite loss or gradient."""

    exit_code = 5


class PeerFailed(UserError):
    """A distributed run lost a peer: a collective or message failed or timed out."""

    exit_code = 6


class Preempted(UserError):
    """A signal asked the run to stop; it saved a checkpoint first."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
