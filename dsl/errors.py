"""User-facing errors: one line naming the key, file or URI and what would be accepted."""


class UserError(RuntimeError):
    """Bad input from the user (missing file, unreachable URI, corrupt checkpoint, empty corpus)."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` folded onto one line (entry points print exactly this)."""
    return " ".join(str(exc).split()) or type(exc).__name__
