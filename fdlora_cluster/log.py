"""One logger for the job: a role tag on every line, a log file per rank, a console that shows
progress, not noise.

    12:00:03 [server] [ROUND 2/3] aggregated 2 updates in 1.20s; ...
    12:00:09 [client 1 leader] rounds 1-3: global loss 0.812 (round 1) -> 0.503 (round 3), ...

Where a line goes (README, "The console"):
- RUN_DIR/logs/rank-<r>.log gets everything this rank says: our lines, the per-step and per-round
  detail (logged with `extra=FILE_ONLY`), third-party logging and Python warnings, and, under
  `fdlora-cluster run` (`capture_output`), whatever is written to the process's stdout and stderr
  (DeepSpeed's prints, transformers' progress bars).
- The console gets the server's and the leaders' own lines (the followers' too with
  `log.followers_on_console`) without the FILE_ONLY detail, the server's progress over rounds
  (`RoundProgress`), and every rank's errors (`console_err`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import traceback

LOGGER_NAME = "fdlora"
FILE_ONLY = {"file_only": True}  # log.info(msg, extra=FILE_ONLY): the rank's log file, never the console

# The process's stdout and stderr before `capture_output` pointed them at the rank's log file.
_console = {"out": None, "err": None}
_root_file = {"handler": None}  # the rank's log file on the root logger (setup_logging)
_bar = None  # the server's open progress bar: console lines are written above it


def console_out():
    return _console["out"] or sys.stdout


def console_err():
    return _console["err"] or sys.stderr


def capture_output(log_path: str) -> None:
    """Point this process's stdout and stderr at the rank's log file, at the file descriptors, so
    that C code, subprocesses and third-party prints land there too; the
    console keeps a copy of the original descriptors (`console_out`, `console_err`), which is where
    our console lines, the server's progress bar and every error go. Errors that escape the
    entry point's handler still reach the console: uncaught exceptions and fatal signals."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _console["out"] = os.fdopen(os.dup(1), "w", buffering=1)
    _console["err"] = os.fdopen(os.dup(2), "w", buffering=1)
    # O_APPEND: the logging FileHandler appends to the same file, so lines never overwrite each other
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable(file=_console["err"])

    def excepthook(kind, value, tb):
        text = "".join(traceback.format_exception(kind, value, tb))
        for f in (sys.stderr, console_err()):
            f.write(text)
            f.flush()

    sys.excepthook = excepthook


class _ConsoleHandler(logging.StreamHandler):
    """The console: skips FILE_ONLY records; writes above the progress bar while one is open."""

    def __init__(self):
        super().__init__(console_out())
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    def emit(self, record):
        if _bar is None:
            return super().emit(record)
        try:
            _bar.write(self.format(record), file=console_out())
        except Exception:
            self.handleError(record)


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
        # Python warnings and the records of libraries without a handler of their own: the file only
        logging.captureWarnings(True)
        root = logging.getLogger()
        if _root_file["handler"] is not None:  # a second job in one process (tests): its file, not the first's
            root.removeHandler(_root_file["handler"])
        root.addHandler(fh)
        _root_file["handler"] = fh
    if console:
        sh = _ConsoleHandler()
        sh.setFormatter(fmt)
        log.addHandler(sh)
    # DeepSpeed and transformers are chatty at INFO; their warnings still reach the rank's log.
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return log


def use_bar(mode: str) -> bool:
    """`log.progress`: `bar`, `lines`, or `auto`: a bar when the console is a terminal. Under
    mpiexec a rank's stdout is a pipe to the launcher even when the user watches a terminal, so
    `fdlora-cluster launch` says whether its own stdout is one (FDLORA_CONSOLE_TTY). A bar's
    redraws in a file (Slurm's output, CI) are one long line of carriage returns, so there, and
    wherever the terminal is not known, the server prints one line per round instead."""
    if mode != "auto":
        return mode == "bar"
    tty = os.environ.get("FDLORA_CONSOLE_TTY")
    if tty is not None:
        return tty == "1"
    try:
        return console_out().isatty()
    except (AttributeError, ValueError):
        return False


class RoundProgress:
    """The server's progress over rounds: a tqdm bar (the round's updates, the clients' mean
    training loss, seconds, bytes and the global adapter's change in its postfix) or one console
    line per round (`use_bar`). Each round's line goes to the log file either way. The loss is the
    mean over the round's accepted updates of each leader's mean loss over its steps (every update
    carries its client's)."""

    def __init__(self, total: int, done: int, mode: str):
        global _bar
        self.bar = None
        if use_bar(mode):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="[server] rounds", unit="round", file=console_out(),
                            dynamic_ncols=True, leave=True)
            _bar = self.bar

    def round_done(self, line: str, postfix: str) -> None:
        get_logger().info(line, extra=FILE_ONLY if self.bar else None)
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        global _bar
        if self.bar is not None:
            self.bar.close()
            self.bar = _bar = None


def text_table(head, rows) -> str:
    """A plain-text table for the console: left-aligned columns, a dashed rule under the head."""
    rows = [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in [tuple(head)] + rows) for i in range(len(head))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def privacy_sentence(p: dict) -> str:
    """What a run spent of client-level differential privacy, from summary.json's `privacy`: the
    line under the results table (train.py) and in each run's line of a report (report.py)."""
    return (f"client-level DP on the global adapter: epsilon = {p['epsilon']:.4g} at delta = {p['delta']:g} after "
            f"{p['rounds']} rounds (clip {p['clip_norm']:g}, noise multiplier {p['noise_multiplier']:g}, "
            f"{p['accountant']} accountant); personal and fused adapters never leave their client")


def human_bytes(n: float) -> str:
    """999 -> '999 B', 1234567 -> '1.23MB' (tqdm's decimal units above 1000 bytes)."""
    from tqdm import tqdm

    return tqdm.format_sizeof(n, "B", 1000) if n >= 1000 else f"{n:.0f} B"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
