"""Checkpoints and resume: what a job needs to go on after round k as if it had never stopped.

A checkpoint is RUN_DIR/checkpoints/round-<k>/, written by every rank at the end of its round k
(checkpoint.every, and after the last round), each when it gets there, waiting for nobody:

    manifest.json              round, config hash, topology, sha256 of every file below
    server.pt                  global adapter, outer-optimizer state, metric records, RNG states
    client-<c>/leader.pt       personal and global adapters, data-stream positions, metric records,
                               byte counters, RNG states (the client's leader)
    client-<c>/rank-<i>.pt     RNG states and data-stream positions of the client's rank i
    client-<c>/deepspeed/      the client's DeepSpeed engine (inner optimizer, fp32 masters, loss
                               scaler; every ZeRO stage), by DeepSpeed's own save_checkpoint
    parts/rank-<r>.json        rank r's files and their sha256, written after them

Off the critical path: at its round boundary a rank only takes a snapshot (every tensor copied
to the CPU, every container copied, so the next round cannot change what is written; DeepSpeed's
engine state is caught the same way, ClientEngine.save_engine) and hands it to its one writer
thread (`Writer`), then goes on training. The writer does the rest: the files, their sha256, the
part list, and, on the last rank to get there, the manifest. At most one write is in flight per
rank: the next snapshot waits for the previous write (memory stays bounded at one snapshot), and
a failed write is raised in the main thread at the next boundary, or when the job ends
(`Checkpointer.close`, which waits for the last write), naming the checkpoint. A main thread
waiting for its writer beats the hang watchdog per file the writer wrote, so a long write is not a
hang, a write stuck longer than `hang_timeout_s` is; the writer never beats on its own (a rank whose
main thread hung must not look alive because its writer is still at work).

Atomic: each rank writes its files into round-<k>.partial/ (each written, fsynced, renamed), then
its part list; the rank that finds every rank's part list there (the last to write; a `claimed`
directory, made with one atomic mkdir, makes sure only one does it) writes the manifest last and
renames the directory. A directory without a manifest is torn and never used (a job killed while
a writer was at work leaves one); a checksum that does not match refuses the resume. A client that skipped round k (it fell behind, federation.
round_timeout_s) writes no part of it: that checkpoint never completes, and its directory is
removed once a later one is complete.

What makes a resumed job bit-identical to an uninterrupted one: every random stream is seeded per
(seed, client, round, adapter) (engine.BatchStream, the dropout seed in ClientEngine.train), each
training phase starts with fresh AdamW state, so the state above is all that carries from one
round to the next; the server's aggregation order is fixed (by client id).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading

import numpy as np
import torch

from .waits import wait_for
from .watchdog import beat

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
PARTIAL = ".partial"
PARTS = "parts"  # each rank's list of its files and their sha256, written after them
CLAIMED = "claimed"  # made (atomically) by the one rank that completes the checkpoint


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint this rank could not write; the message names its directory and the cause."""


# Settings added after checkpoints existed, as (section, key, default): left out of the hash at
# their default, so that the checkpoints of runs made before them still resume.
ADDED_LATER = [("personal", "residual", False), ("fusion", "margin", 1.0), ("outer", "momentum_warmup", 0),
               ("global", "combine", "factors"), ("federation", "on_short_round", "abort"),
               ("federation", "round_timeout_factor", 2.0), ("fusion", "fold_search", "refit"),
               ("fusion", "fold_back_steps", 0)]


def config_hash(cfg) -> str:
    """sha256 of the settings a checkpoint depends on: everything but where the run is written,
    how often it is checkpointed, and what is only observed (logging, the hang watchdog)."""
    d = cfg.to_dict()
    for k in ("output_dir", "checkpoint"):
        d.pop(k, None)
    d["log"].pop("digests", None)
    d["federation"].pop("hang_timeout_s", None)  # a watchdog changes nothing computed: a resume may set it
    for section, key, default in ADDED_LATER:
        if d[section].get(key) == default:
            d[section].pop(key)
    if d.get("privacy") is None:  # added later too: off hashes as before the section existed
        d.pop("privacy", None)
    for o in d.get("client_overrides", {}).values():  # a per-client rank, added later
        if o.get("lora") == {"global": {"r": None, "alpha": None}}:
            o.pop("lora")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def round_dir(run_dir: str, k: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, f"round-{k:05d}")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _write_json_atomic(obj, path: str) -> None:
    """json.dump `obj` to `path` (write, fsync, rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_atomic(obj, path: str) -> str:
    """torch.save `obj` to `path` (write, fsync, rename); returns the file's sha256."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def snapshot(obj):
    """A copy of `obj` that nothing the job does next can change: every tensor copied to the CPU
    (a tensor met twice is copied once), dicts, lists and tuples rebuilt, other values deep-copied
    (numbers and strings as they are). What the writer thread saves while training goes on."""
    memo: dict[int, object] = {}

    def copy(x):
        if isinstance(x, (str, int, float, bool, type(None))):
            return x
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, torch.Tensor):
            out = x.detach().to("cpu", copy=True)
        elif isinstance(x, dict):
            out = type(x)((k, copy(v)) for k, v in x.items()) if type(x) is dict else _deepcopy(x)
        elif type(x) in (list, tuple):
            out = type(x)(copy(v) for v in x)
        else:
            out = _deepcopy(x)
        memo[id(x)] = out
        return out

    return copy(obj)


def _deepcopy(x):
    import copy

    return copy.deepcopy(x)


class Writer:
    """This rank's one checkpoint writer thread; at most one write in flight.

    `submit(where, job)` waits for the previous write (raising its error), then runs `job()` on
    the thread; `wait()` waits for the write in flight and raises its error, as a
    CheckpointWriteError naming `where`. The thread is a daemon: a job that ends without waiting
    (it failed elsewhere, or was killed) leaves a torn checkpoint, which resume ignores.

    Heartbeats (watchdog.py): the job calls `progressed()` per file, and only a main thread
    waiting in `wait()` turns that into a beat. The writer never beats itself: its files would
    keep a rank whose main thread hangs looking alive (and name a peer blocked behind it first)."""

    def __init__(self):
        self._idle = threading.Condition()
        self._progress = 0  # files written so far (progressed())
        self._job = None  # (where, job) handed over and not yet done
        self._error: tuple[str, BaseException] | None = None
        self._thread: threading.Thread | None = None

    def submit(self, where: str, job) -> None:
        self.wait()
        with self._idle:
            self._job = (where, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="fdlora-checkpoint-writer", daemon=True)
                self._thread.start()
            self._idle.notify_all()

    def progressed(self) -> None:
        """The job wrote a file (called on the writer thread)."""
        with self._idle:
            self._progress += 1
            self._idle.notify_all()

    def wait(self) -> None:
        """Block until no write is in flight, beating the watchdog each time the writer wrote a
        file (a stuck write is a hang the watchdog reports); raise the failure of the last write,
        if it failed."""
        with self._idle:
            seen = self._progress
            while self._job is not None:
                self._idle.wait(0.5)
                if self._progress != seen:
                    seen = self._progress
                    beat()
            error, self._error = self._error, None
        if error is not None:
            where, e = error
            raise CheckpointWriteError(f"checkpoint {where}: writing it failed: {type(e).__name__}: {e}") from e

    def _loop(self) -> None:
        while True:
            with self._idle:
                self._idle.wait_for(lambda: self._job is not None)
                where, job = self._job
            try:
                job()
            except BaseException as e:  # handed to the main thread, which fails the job with it
                error = (where, e)
            else:
                error = None
            with self._idle:
                self._error, self._job = error, None
                self._idle.notify_all()


class Checkpointer:
    """One rank's side of writing and reading checkpoints. Every rank snapshots the files it owns
    at its own round boundary and its writer thread writes them (`write`); no rank waits for
    another. `close()` at the job's end waits for the last write."""

    def __init__(self, cfg, topo, run_dir: str):
        self.cfg, self.topo, self.run_dir = cfg, topo, run_dir
        self.every = cfg.checkpoint.every
        self.resumed: str | None = None  # the checkpoint directory this job resumed from
        self.resumed_round = 0
        self.world_size = topo.world.Get_size()  # read here: the writer thread makes no MPI call
        self.writer = Writer()

    def due(self, k: int) -> bool:
        """Is a checkpoint written at the end of round k (not again for the round resumed from)?"""
        if self.every <= 0 or k < 1 or k <= self.resumed_round:
            return False
        return k % self.every == 0 or k == self.cfg.train.rounds

    def partial(self, k: int) -> str:
        return round_dir(self.run_dir, k) + PARTIAL

    def write(self, k: int, files: dict[str, object], written: list[str] = (), done=None) -> None:
        """Snapshot this rank's `files` ({path relative to the checkpoint: object}) for round k and
        hand them to the writer thread, which saves them, then the part list with their sha256 and
        those of `written` (files this rank already put there: DeepSpeed's recovery scripts);
        the rank that finds every part list there completes the checkpoint; then `done()` (the
        leader's log line), on the writer thread. Waits first for this rank's previous write (and
        raises its failure)."""
        self.writer.wait()
        files, written = snapshot(files), list(written)

        def job():
            self._write(k, files, written)
            if done is not None:
                done()

        self.writer.submit(self.partial(k), job)

    def close(self) -> None:
        """Wait for the last write (the job's end); raise its failure."""
        self.writer.wait()

    def _write(self, k: int, files: dict[str, object], written: list[str]) -> None:
        """The writer thread's part of `write`."""
        part = self.partial(k)
        digests = {}
        for rel, obj in files.items():
            digests[rel] = save_atomic(obj, os.path.join(part, rel))
            self.writer.progressed()  # a heartbeat, should the main thread be waiting (Writer)
        for rel in written:
            digests[rel] = sha256_file(os.path.join(part, rel), fsync=True)
        lists = os.path.join(part, PARTS)
        _write_json_atomic(digests, os.path.join(lists, f"rank-{self.topo.rank}.json"))
        try:
            if sum(n.endswith(".json") for n in os.listdir(lists)) < self.world_size:
                return  # a rank still to write completes it
        except FileNotFoundError:
            return  # another rank, which wrote its list just after this one, completed it already
        try:
            os.mkdir(os.path.join(part, CLAIMED))  # atomic: of two ranks that both found every list, one goes on
        except (FileExistsError, FileNotFoundError):  # another rank completes it (or has: renamed)
            return
        manifest = {"round": k, "config_hash": config_hash(self.cfg), "clients": self.cfg.client_sizes(),
                    "strategy": self.cfg.strategy, "files": {}}
        for name in sorted(n for n in os.listdir(lists) if n.endswith(".json")):
            with open(os.path.join(lists, name)) as f:
                manifest["files"].update(json.load(f))
        _write_json_atomic(manifest, os.path.join(part, MANIFEST))
        final = round_dir(self.run_dir, k)
        if os.path.exists(final):  # a job resumed from an older checkpoint writes the later rounds again
            shutil.rmtree(final)
        os.replace(part, final)
        _fsync_dir(os.path.dirname(final))
        self._prune(k)

    def _prune(self, k: int) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints; drop the torn ones before round
        k (a client that skipped their round never writes its part; the others wrote theirs)."""
        done = complete_checkpoints(self.run_dir)
        for _, path in done[:-self.cfg.checkpoint.keep]:
            shutil.rmtree(path, ignore_errors=True)
        root = os.path.join(self.run_dir, CHECKPOINTS)
        for n in os.listdir(root):
            if n.endswith(PARTIAL) and n.startswith("round-") and int(n[len("round-"):-len(PARTIAL)]) < k:
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)

    def wait_complete(self, k: int) -> None:
        """Wait (yielding) until the checkpoint of round k is complete, when one is due (tests:
        faults.maybe_fail)."""
        if self.due(k):
            wait_for(lambda: os.path.isfile(os.path.join(round_dir(self.run_dir, k), MANIFEST)))

    def load(self, rel: str):
        return torch.load(os.path.join(self.resumed, rel), map_location="cpu", weights_only=False)


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(round, directory) of every checkpoint with a manifest, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    out = []
    if os.path.isdir(root):
        for n in os.listdir(root):
            p = os.path.join(root, n)
            if n.startswith("round-") and not n.endswith(PARTIAL) and os.path.isfile(os.path.join(p, MANIFEST)):
                try:
                    out.append((int(n.removeprefix("round-")), p))
                except ValueError:
                    continue
    return sorted(out)


def find_checkpoint(resume: str, output_dir: str) -> str | None:
    """The checkpoint directory `--resume` names: `auto` = the newest complete one under the run
    directory (None when there is none yet: the job starts from the beginning); a run directory =
    its newest complete one; a round-<k> directory = that one."""
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1][1] if done else None
    path = resume.rstrip("/")
    if not os.path.isdir(path):
        raise ResumeError(f"--resume {resume}: no such directory")
    if os.path.basename(path).startswith("round-"):
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise ResumeError(f"--resume {resume}: torn checkpoint (no {MANIFEST}: the job stopped while writing it)")
        return path
    done = complete_checkpoints(path)
    if not done:
        raise ResumeError(f"--resume {resume}: no complete checkpoint under {os.path.join(path, CHECKPOINTS)}")
    return done[-1][1]


def validate(path: str, cfg) -> dict:
    """The checkpoint's manifest, after checking that it belongs to this config and topology and
    that every file is there with its recorded checksum."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ResumeError(f"checkpoint {path}: unreadable {MANIFEST} ({e})") from None
    if manifest.get("clients") != cfg.client_sizes():
        raise ResumeError(f"checkpoint {path} was written by a job with clients {manifest.get('clients')} "
                          f"(ranks per client); this job has {cfg.client_sizes()}")
    if manifest.get("config_hash") != config_hash(cfg):
        raise ResumeError(f"checkpoint {path} was written with another config (hash {manifest.get('config_hash')}, "
                          f"this one {config_hash(cfg)}): compare {os.path.join(os.path.dirname(os.path.dirname(path)), 'config.yaml')} "
                          "with this job's settings (only output_dir and checkpoint.* may change on resume)")
    for rel, want in sorted(manifest["files"].items()):
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            raise ResumeError(f"checkpoint {path}: {rel} is missing")
        got = sha256_file(p)
        if got != want:
            raise ResumeError(f"checkpoint {path}: {rel} is corrupt (sha256 {got[:12]}..., manifest says {want[:12]}...)")
    return manifest


def agree_on_resume(cfg, topo, resume: str | None, ckpt: Checkpointer) -> None:
    """Collective over the world: the server finds and checks the checkpoint (and clears torn
    ones left by a killed job), every rank learns the outcome, and all raise the same error."""
    result = None
    if topo.is_server:
        try:
            path = find_checkpoint(resume, cfg.output_dir) if resume else None
            round_k = validate(path, cfg)["round"] if path else 0
            root = os.path.join(cfg.output_dir, CHECKPOINTS)
            if os.path.isdir(root):
                for n in os.listdir(root):
                    if n.endswith(PARTIAL):
                        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            result = ("ok", path, round_k)
        except ResumeError as e:
            result = ("error", str(e), 0)
    status, what, round_k = topo.world.bcast(result, root=0)
    if status == "error":
        raise ResumeError(what)
    ckpt.resumed, ckpt.resumed_round = what, round_k
