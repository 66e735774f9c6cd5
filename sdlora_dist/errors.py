"""The exceptions that end a command with one readable line instead of a traceback.

``UserError`` is the one a user can cause: the CLI prints its message and exits with code 2. ``RankFailure`` ends a
rank whose collective failed; the front door names it as the consequence of a peer's failure.
"""


class UserError(Exception):
    """Bad input from the user (path, config value, benchmark name, file contents): say what and what to do."""


class RankFailure(RuntimeError):
    """A collective failed: a peer rank died, or did not answer within the process-group timeout."""


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite: training stopped before that step changed any weight."""
