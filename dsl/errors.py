"""User-facing errors: one line naming the key, file or URI and what would be accepted."""


class UserError(RuntimeError):
    """Bad input from the user (missing file, unreachable URI, corrupt checkpoint, empty corpus)."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` folded onto one line (entry points print exactly this)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_cli(body) -> int:
    """Run an entry point: print ``body()``'s summary as JSON on the last stdout line and return 0, or
    print one ``error: ...`` line to stderr and return 2 for a bad key, value, file or URI."""
    import json
    import sys

    from dsl.config import ConfigError

    try:
        summary = body()
    except (ConfigError, UserError) as exc:
        from dsl.redact import scrub

        print(f"error: {scrub(one_line(exc))}", file=sys.stderr)
        return 2
    print(json.dumps(_scrubbed(summary), sort_keys=True))
    return 0


def _scrubbed(value):
    """``value`` with every string passed through :func:`dsl.redact.scrub` (URIs in a summary)."""
    from dsl.redact import scrub

    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v) for v in value]
    return value
