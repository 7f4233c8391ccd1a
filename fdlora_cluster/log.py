"""One logger for the job: a role tag on every line, a log file per rank, a quiet console for followers.

    [server] [ROUND 2/3] aggregated 2 updates
    [client 1 leader]   step 3/3 loss 0.4123
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "fdlora"


def setup_logging(role: str, rank: int, log_dir: str | None, level: str = "INFO", console: bool = True) -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    log.handlers.clear()
    log.setLevel(level)
    log.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [{role}] %(message)s", datefmt="%H:%M:%S")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(log_dir, f"rank-{rank}.log"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        log.addHandler(sh)
    # DeepSpeed and transformers are chatty at INFO; their warnings still reach the rank's log.
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return log


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
