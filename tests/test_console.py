"""The console shows progress, not noise (log.py): a real job's console fits on one screen, with one
line per round from the server and one per phase from each leader; the per-step lines and what
the libraries print (asked for here, torch's C++ INFO lines, which every client rank writes to its
own stderr from C code) are in the ranks' log files only."""

import io
import logging
import re

import pytest

from fdlora_cluster import log as fdlog

from conftest import TINY, assert_ok


@pytest.fixture(scope="module")
def job(finished_run):
    """The suite's shared finished run (conftest.finished_run): `fdlora-cluster run` of the demo,
    TINY, with torch's C++ logging at INFO: lines written by C code to fd 2 of every client rank, as
    other libraries' prints are; they must land in the rank's log file, not here."""
    return finished_run.proc, finished_run.dir


@pytest.mark.job
def test_the_console_has_one_line_per_round_and_phase(job):
    proc, run = job
    assert_ok(proc)
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) <= 40, "\n".join(console)  # the demo's 10 rounds: 8 more lines (one per round)
    rounds = [line for line in console if "[server] [ROUND " in line]
    assert len(rounds) == TINY["train.rounds"], console  # not a terminal: one line per round, no bar
    for c, leader in ((0, 1), (1, 3)):
        mine = [line for line in console if f"[client {c} leader]" in line]
        assert any("personal stage: 2 steps in" in line for line in mine), mine
        assert any(re.search(r"rounds 1-2: global loss [0-9.]+ \(round 1\) -> [0-9.]+ \(round 2\), 4 steps", line)
                   for line in mine), mine
        assert len(mine) <= 5, mine  # start, personal stage, rounds, fusion (+ a warning at most)
    assert "results per client" in proc.stdout


@pytest.mark.job
def test_each_round_line_has_the_clients_mean_training_loss(job):
    """Every update carries its leader's mean loss over the round's steps: the server records them
    (metrics.jsonl, in the order of `clients`) and prints their mean in the round's line."""
    import json

    proc, run = job
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    trained = {(r["client"], r["round"]): r["loss"] for r in recs if r["event"] == "train" and r["adapter"] == "global"}
    console = (proc.stdout + proc.stderr).splitlines()
    for r in (r for r in recs if r["event"] == "round"):
        t = r["round"]
        assert r["train_loss"] == [trained[(c, t)] for c in r["clients"]], r
        mean = sum(r["train_loss"]) / len(r["train_loss"])
        line = next(x for x in console if f"[server] [ROUND {t}/" in x)
        assert f"client loss {mean:.4f};" in line, line


@pytest.mark.job
def test_steps_and_library_output_are_in_the_log_files_only(job):
    proc, run = job
    out = proc.stdout + proc.stderr
    assert " step " not in out and "checkpoint of round" not in out
    assert "rank 2]" not in out and "rank 4]" not in out  # followers are quiet
    # torch's C++ INFO lines ([I1126 ... c10d]), written by C code straight to fd 2 of every client rank
    assert not re.search(r"^\[I\d{4} ", out, re.M), out[-3000:]
    leader = (run / "logs" / "rank-1.log").read_text()
    assert "[personal stage] personal step 2/2 loss" in leader and "[round 2] global step 2/2 loss" in leader
    assert "[round 1] global: 2 steps in" in leader and "checkpoint of round 1 written" in leader
    for rank in (1, 2, 3, 4):  # ... of every client rank: in its own file
        text = (run / "logs" / f"rank-{rank}.log").read_text()
        assert re.search(r"^\[I\d{4} .*\[c10d\]", text, re.M), rank


@pytest.mark.unit
def test_the_progress_rule():
    assert fdlog.use_bar("bar") and not fdlog.use_bar("lines")


@pytest.mark.unit
def test_auto_progress_follows_the_launchers_terminal(monkeypatch):
    monkeypatch.setenv("FDLORA_CONSOLE_TTY", "1")
    assert fdlog.use_bar("auto")
    monkeypatch.setenv("FDLORA_CONSOLE_TTY", "0")
    assert not fdlog.use_bar("auto")
    monkeypatch.delenv("FDLORA_CONSOLE_TTY")
    monkeypatch.setitem(fdlog._console, "out", io.StringIO())  # not a terminal
    assert not fdlog.use_bar("auto")


@pytest.mark.unit
def test_the_bar_carries_the_rounds_and_lines_print_above_it(tmp_path, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setitem(fdlog._console, "out", screen)
    log = fdlog.setup_logging("server", 0, str(tmp_path), console=True)
    progress = fdlog.RoundProgress(total=3, done=0, mode="bar")
    try:
        for t in (1, 2, 3):
            if t == 2:
                log.warning("  round 2: client 1 missing")
            progress.round_done(f"[ROUND {t}/3] aggregated", f"2 updates, 0.{t}0 s, 32.9 kB")
    finally:
        progress.close()
        logging.getLogger(fdlog.LOGGER_NAME).handlers.clear()
        logging.getLogger().removeHandler(fdlog._root_file["handler"])
        logging.captureWarnings(False)
    shown = screen.getvalue()
    assert "3/3" in shown and "0.30 s, 32.9 kB" in shown and "\r" in shown
    assert "[ROUND 1/3]" not in shown  # a bar instead of the round lines ...
    assert re.search(r"(^|[\r\n])\d\d:\d\d:\d\d \[server\]   round 2: client 1 missing\n", shown), shown  # ... lines above it
    file = (tmp_path / "rank-0.log").read_text()
    assert all(f"[ROUND {t}/3] aggregated" in file for t in (1, 2, 3))  # the file has every round
