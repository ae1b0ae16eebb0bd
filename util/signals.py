"""SIGTERM handled like Ctrl-C (``Terminated``, a KeyboardInterrupt), so that what stops a
command cleanly runs for both; the signals of pool workers. (The training loop notes both
signals itself, to stop after a step with a checkpoint.)"""
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
    """While the block runs, SIGTERM raises Terminated (in the main thread: Python's signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def worker_pool(context, processes):
    """`context.Pool(processes)` whose workers ignore Ctrl-C (the parent stops them) and end on
    SIGTERM as by default, forked with it blocked: a Python handler never runs while a worker
    blocks on the task queue's lock (Pool.terminate sends SIGTERM), and the parent would hang."""
    if threading.current_thread() is not threading.main_thread():
        return context.Pool(processes, _worker_start)
    # A SIGTERM for this process during the fork (lost in fork's hooks) is sent again after.
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
