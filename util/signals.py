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


def worker_pool(context, processes):
    """`context.Pool(processes)` for use inside sigterm_as_interrupt: its workers ignore
    Ctrl-C (the parent stops them as it leaves the pool) and end on SIGTERM as by default.

    Not through Terminated: Pool.terminate sends SIGTERM to idle workers, and a handler
    written in Python is never run for a signal that arrives just before a worker blocks on
    the task queue's lock, which leaves the parent waiting for that worker forever (it would
    also print a traceback from every worker). So the workers are forked with SIGTERM held
    back, and let it in only once it ends them; a SIGTERM for this process meanwhile is
    noted (raised inside fork's hooks it would be lost), and once the pool is ended, sent
    again to meet the usual handler."""
    if threading.current_thread() is not threading.main_thread():
        return context.Pool(processes, _worker_start)
    arrived = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: arrived.append(signum))
    mask = hasattr(signal, "pthread_sigmask")  # POSIX, like fork
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if mask else None
    try:
        pool = context.Pool(processes, _worker_start)
    finally:
        if mask:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        signal.signal(signal.SIGTERM, previous)
    if arrived:
        pool.terminate()
        signal.raise_signal(signal.SIGTERM)
    return pool


def _worker_start():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
