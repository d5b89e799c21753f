"""User-facing errors: one line naming the key, file or URI and what would be accepted; and how an
entry point ends when it is stopped (Ctrl-C, a kill, a closed terminal)."""

import signal


class UserError(RuntimeError):
    """Bad input from the user (missing file, unreachable URI, corrupt checkpoint, empty corpus)."""


class JobFailed(RuntimeError):
    """A run that failed for a reason outside its input (a worker killed by an out-of-memory monitor, a
    lost node) after its retries: one line naming the cause, exit code 1."""


class Stopped(BaseException):
    """The job was asked to stop by a signal (SIGTERM, SIGHUP). Like KeyboardInterrupt (SIGINT) it is not
    an Exception: ordinary error handling lets it through, and whatever records the run marks it KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_stopped(signum: int, frame) -> None:
    for other in STOP_SIGNALS:  # one-shot: a second signal during the clean-up ends the process at once
        signal.signal(other, signal.SIG_DFL)
    raise Stopped(signum)


def install_stop_handlers() -> None:
    """Turn SIGTERM/SIGHUP into :class:`Stopped` in the main thread (SIGINT already raises
    KeyboardInterrupt), so that ``finally`` blocks run and open records are closed as killed."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _raise_stopped)


def was_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` ends a run because someone stopped it (rather than because it failed)."""
    return isinstance(exc, (KeyboardInterrupt, Stopped))


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` folded onto one line (entry points print exactly this)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_cli(body) -> int:
    """Run an entry point: print ``body()``'s summary as JSON on the last stdout line and return 0, or
    print one ``error: ...`` line to stderr and return 2 for a bad key, value, file or URI (1 for a
    :class:`JobFailed`). Stopped by a signal, it says so in one line and returns 128 + the signal number,
    as a shell reports it."""
    import json
    import sys

    from dsl.config import ConfigError

    install_stop_handlers()
    try:
        summary = body()
    except (ConfigError, UserError, JobFailed) as exc:
        from dsl.redact import scrub

        print(f"error: {scrub(one_line(exc))}", file=sys.stderr)
        return 1 if isinstance(exc, JobFailed) else 2
    except (KeyboardInterrupt, Stopped) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + int(signum)
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
