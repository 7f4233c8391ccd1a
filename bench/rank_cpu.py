"""Run one rank of `fdlora-cluster` and, at its exit, write the rank's CPU seconds and wall seconds
(and its CPU seconds sampled every 0.2 s, to cut out a phase) to $RANK_CPU_DIR/rank-<r>.json (bench/scaling.py starts a job with this as the per-rank command).

    mpiexec -n 5 env RANK_CPU_DIR=out python bench/rank_cpu.py run CONFIG

Which `fdlora_cluster` runs is whichever PYTHONPATH finds first (the bench points it at this
tree, or at an unpacked copy of main for the before/after comparison).
"""

import atexit
import json
import os
import resource
import runpy
import sys
import threading
import time

START = time.monotonic()


def _write() -> None:
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    use = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    import fdlora_cluster

    out = {"rank": rank, "cpu_s": use.ru_utime + use.ru_stime, "user_s": use.ru_utime, "sys_s": use.ru_stime,
           "wall_s": time.monotonic() - START, "package": os.path.dirname(fdlora_cluster.__file__),
           "samples": SAMPLES}
    with open(os.path.join(os.environ["RANK_CPU_DIR"], f"rank-{rank}.json"), "w") as f:
        json.dump(out, f)


SAMPLES: list = []  # (time.time(), this process's CPU seconds), every 0.2 s: CPU within a phase


def _sample() -> None:
    while True:
        SAMPLES.append((time.time(), time.process_time()))
        time.sleep(0.2)


threading.Thread(target=_sample, daemon=True).start()
atexit.register(_write)  # registered before mpi4py's own exit hook, so it runs after MPI_Finalize
sys.argv = ["fdlora-cluster", *sys.argv[1:]]
runpy.run_module("fdlora_cluster.cli", run_name="__main__")
