"""The hang watchdog (`federation.hang_timeout_s`): a rank that stops making progress ends the job, named.

Progress is a heartbeat, `beat()`, that the rank's main thread gives where it works or waits:
every poll of a wait on MPI (`waits.wait_for`, so a rank that waits on a peer counts as
alive), every training step, every evaluation batch, every checkpoint file written while the main
thread waits for its writer thread (checkpoint.Writer). A daemon thread per
rank (`start`) watches it; after `hang_timeout_s` seconds without one it prints on the console
which rank it is (the server, or client c's leader or rank r), for how long it made no progress,
and every thread's Python stack (faulthandler), then ends the job: MPI_Abort, and should that not
return (its main thread holds MPI), `os._exit` a few seconds later, after which the launcher stops
the other ranks as it does for a rank that dies. It needs nothing from the main thread, so it
works whatever that thread is stuck in: a deadlock, a blocking MPI or torch collective.

A peer blocked in a collective behind the hung rank stops beating too, but later (it was still
progressing when it reached the collective), so the hung rank speaks first. A stretch in which the
watchdog thread itself did not run (a machine so loaded or swapping that the process was not
scheduled, or a main thread holding the GIL) is not counted against the rank; so a hang that
holds the GIL (inside C code that never releases it) is not detected.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time

EXIT_STATUS = 70  # the job's status when the watchdog ended it
_last = time.monotonic()


def beat() -> None:
    """This rank made progress (cheap: one clock read; called at every poll of every wait)."""
    global _last
    _last = time.monotonic()


def start(timeout_s: float | None, who: str, stream, abort=None) -> threading.Thread | None:
    """Watch this rank: `who` names it in the report (`rank 3, client 1 leader`), `stream` is the
    console (a file with a descriptor, for faulthandler), `abort()` ends the job (MPI_Abort);
    None (no `hang_timeout_s`): no watchdog."""
    if timeout_s is None:
        return None
    beat()

    def watch():
        global _last
        while True:
            checked = time.monotonic()
            idle = checked - _last
            if idle >= timeout_s:
                break
            nap = min(0.5, timeout_s - idle + 0.01)
            time.sleep(nap)
            overslept = time.monotonic() - checked - nap
            if overslept > 1.0:  # this thread was not run meanwhile (the machine stalled): no count against the rank
                _last += overslept
        print(f"[{who}] hang: no progress for {idle:.1f} s (federation.hang_timeout_s = {timeout_s:g}); "
              "ending the job. Its Python stack, most recent call first per thread:", file=stream, flush=True)
        faulthandler.dump_traceback(file=stream, all_threads=True)
        stream.flush()
        threading.Timer(5.0, os._exit, (EXIT_STATUS,)).start()  # if the abort below never returns
        if abort is not None:
            time.sleep(1.0)  # the launcher forwards the report above before the abort tears the job down
            abort(EXIT_STATUS)
        os._exit(EXIT_STATUS)

    thread = threading.Thread(target=watch, name="fdlora-watchdog", daemon=True)
    thread.start()
    return thread
