"""User-facing errors.

A ScalelabError is the one exception type the CLI turns into a one-line
message and a non-zero exit; anything else is a bug and keeps its traceback.
"""


class ScalelabError(Exception):
    """Bad input from the user: a missing file, an empty corpus, a bad config key."""


def check_config(checks) -> None:
    """Raise the first failed ``(ok, message)`` check as ``invalid config: message``."""
    for ok, message in checks:
        if not ok:
            raise ScalelabError(f"invalid config: {message}")
