"""How every command line here starts and ends: ``OneLineParser`` (a bad flag is one line),
``run_cli`` (what stops a command is one line on stderr and its exit status: 0 done, 1 the
machine or the run, 2 input the user can fix, 130 / 143 Ctrl-C / SIGTERM; docs/failures.md)."""
import argparse
import contextlib
import os
import sys

from .signals import interrupt_status, sigterm_as_interrupt
from .text import one_line

EXIT_MACHINE, EXIT_INPUT = 1, 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, with `error: MESSAGE (see PROG --help)` and exit status 2 on bad flags."""

    def error(self, message):
        # Subcommand parsers are named "PROG SUB"; the top-level help lists them all.
        prog = self.prog if self.prog.startswith("python") else f"python {self.prog}"
        self.exit(EXIT_INPUT, f"error: {message} (see {prog} --help)\n")


class UsageError(ValueError):
    """Input a command refuses before it starts: exit status 2, the message as its line."""


class Stopped(Exception):
    """Stop with exit status `code` after saying `message` as it is (not an error line), e.g.
    an interruption with the command that continues; under torchrun only process 0 says it."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def say(line):
    print(line, file=sys.stderr)


def run_cli(body, *, errors=(), interrupted="{what}", cannot="write", os_hint="",
            os_status=EXIT_MACHINE):
    """`body()`'s exit status (SIGTERM an interruption), whatever stops it one stderr line
    (docs/failures.md). `errors`: (types, status) pairs, or a function returning them, called
    once one arrives; an OSError is `error: cannot {cannot} FILE: REASON{os_hint}`; a bug raises."""
    try:
        with sigterm_as_interrupt():
            return body()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        say(e.code)
        return EXIT_MACHINE
    except KeyboardInterrupt as e:
        code, what = interrupt_status(e)
        say(interrupted.format(what=what))
        return code
    except Stopped as e:
        if str(e) and os.environ.get("RANK", "0") == "0":
            say(str(e))
        return e.code
    except Exception as e:
        pairs = [(UsageError, EXIT_INPUT)]
        with contextlib.suppress(Exception):  # the command's own imports fail: report that error
            pairs += errors() if callable(errors) else errors
        status = next((status for kinds, status in pairs if isinstance(e, kinds)), None)
        if status is None and isinstance(e, OSError):
            where = f" {e.filename}" if e.filename else ""
            hint = getattr(e, "hint", os_hint)  # the command's own, where it knows better
            say(f"error: cannot {cannot}{where}: {e.strerror or one_line(e)}{hint}")
            return os_status
        if status is None:
            raise
        say(f"error: {one_line(e)}")
        return status


@contextlib.contextmanager
def start_up(message="{what} during start-up; nothing was written"):
    """Around the imports a `python -m PACKAGE.MODULE` command runs before its run_cli (in its
    package's __init__): Ctrl-C or SIGTERM there is `message` and exit 130 / 143."""
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt as e:
        code, what = interrupt_status(e)
        say(message.format(what=what))
        raise SystemExit(code) from None
