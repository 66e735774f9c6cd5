"""The exceptions that end a command with one readable line instead of a traceback.

``UserError`` is the one a user can cause: the CLI prints its message and exits with code 2. ``RankFailure`` ends a
rank whose collective failed; the front door names it as the consequence of a peer's failure.
"""

from collections.abc import Iterable


def listed(items: Iterable[object], limit: int = 5, sep: str = ", ") -> str:
    """The first ``limit`` items joined, then how many were cut: ``a, b, c and 5 more`` (for messages)."""
    items = [str(item) for item in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


class UserError(Exception):
    """Bad input from the user (path, config value, benchmark name, file contents): say what and what to do."""


class RankFailure(RuntimeError):
    """A collective failed: a peer rank died, or did not answer within the process-group timeout."""


class ServerUnreachable(UserError):
    """A server holding the data could not be reached after the retries (5xx, resets, timeouts): the data is fine
    and the run is kept, to be resumed once the server is back."""


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite: training stopped before that step changed any weight."""
