"""Holding a Ctrl-C (a notebook's "interrupt the kernel") until an update is applied whole."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupt():
    """Hold a Ctrl-C / kernel interrupt until the block ends, so an update is never half-applied; a second
    interrupt gives up waiting.

    Only possible in the main thread (signal handlers); elsewhere the block runs unguarded, which is fine
    because background training is stopped with `PPOTrainer.stop()`, not with an interrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        if received:  # second interrupt: give up waiting
            raise KeyboardInterrupt
        received.append(signum)
        print("Interrupt received: finishing the current update first (interrupt again to force).")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
