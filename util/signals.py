"""SIGTERM handled like Ctrl-C: one line and a clean stop instead of a silent death.

Python turns SIGINT into KeyboardInterrupt, which every command already catches to stop
cleanly (and print the command that continues). ``sigterm_as_interrupt`` makes SIGTERM
(a scheduler's pre-emption, ``kill``) raise ``Terminated``, a KeyboardInterrupt, so that the
same handlers run; ``interrupt_status`` tells them which exit status and word to use.
The training loop installs its own handlers for both signals while it trains (it stops at
the end of a step and writes a checkpoint first) and puts these back afterwards.
"""
import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (exit status 143)."""


def interrupt_status(interrupt):
    """(exit status, what stopped us) for a KeyboardInterrupt or Terminated."""
    return (143, "SIGTERM") if isinstance(interrupt, Terminated) else (130, "interrupted")


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises Terminated (in the main thread only: Python
    delivers signals there, and only there may handlers be installed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def pool_worker_init():
    """The initializer of a multiprocessing pool started inside sigterm_as_interrupt: in the
    workers Ctrl-C is ignored (the parent stops them as it leaves the pool) and SIGTERM ends
    them at once, as by default. A handler written in Python cannot do that: Pool.terminate
    sends SIGTERM to idle workers, and one that arrives just before a worker blocks on the
    task queue's lock is never run, which leaves the parent waiting for that worker forever
    (inherited, it would also print a traceback of Terminated from every worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
