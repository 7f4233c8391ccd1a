"""Real cluster pieces on one machine, for the launch tests: sshd, network-namespace hosts, munge, Slurm.

Every piece is a context manager that starts what it needs and, on the way out (failure
included), stops exactly what it started: daemons by their pid files, namespaces by name,
/etc/hosts lines by their marker, the ssh client config file it wrote. Setup first removes what a
killed earlier run may have left, so it is idempotent. One machine-wide lock serialises test
sessions that use these pieces (they share names, addresses and /etc/hosts).

    with cluster_lock(), ssh_keys(), netns_hosts() as hosts, slurm(hosts) as cluster:
        cluster.run(["sbatch", "--wait", ...])

Recipes: /work/shared/notes/{slurm,multinode-netns,deepspeed-launcher}.md, docs/LAUNCH.md.
Only loopback and the namespaces' own 10.77.0.0/24 addresses are used.

`python tests/cluster/hosts.py down` removes leftovers by hand (after a `kill -9` of pytest).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STATE = Path(os.environ.get("FDLORA_CLUSTER_STATE", "/tmp/fdlora-cluster-test"))
LOCK = Path("/tmp/fdlora-cluster-test.lock")
MARK = "# fdlora-cluster-test"
SSH_CLIENT_CONF = Path("/etc/ssh/ssh_config.d/fdlora-cluster-test.conf")
LOCAL_SSH_PORT = 2222  # our sshd on 127.0.0.1 (a system sshd may own port 22)
SUBNET = "10.77.0"


@dataclass(frozen=True)
class Host:
    """A host simulated by a network namespace (own address) plus a UTS namespace (own hostname)."""

    name: str  # hostname, e.g. node-a
    netns: str  # network namespace, e.g. fdlora-a
    addr: str  # e.g. 10.77.0.1

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run on this host: in its network namespace, under its hostname. nsenter, not
        `ip netns exec` (which remounts /sys; slurmd then finds no cgroup filesystem)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "sh", "-c",
                f'hostname {self.name} && exec "$@"', "sh", *cmd]


HOSTS = (Host("node-a", "fdlora-a", f"{SUBNET}.1"), Host("node-b", "fdlora-b", f"{SUBNET}.2"))
VETH = ("fdlora-va", "fdlora-vb")


# --------------------------------------------------------------------------- helpers


def sh(cmd: list[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command under a timeout; a failure raises with its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def missing_prerequisites(*commands: str) -> str | None:
    """Why these tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd, Slurm daemons)"
    absent = [c for c in commands if shutil.which(c) is None and not os.path.exists(c)]
    if absent:
        return f"missing {', '.join(absent)} (tests/cluster/install.sh installs them)"
    return None


def kill_pidfiles(*paths: Path, timeout: float = 10) -> None:
    """SIGTERM the processes named in pid files (all at once), SIGKILL those that linger after
    `timeout`, remove the files. A pid file left by a daemon that died long ago may name an
    unrelated process by now: only a process whose command name is the pid file's daemon
    (slurmd-node-a.pid -> slurmd) is signalled."""
    pids = [pid for pid in map(_daemon_pid, paths) if pid is not None]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for path in paths:
        path.unlink(missing_ok=True)


def _daemon_pid(path: Path) -> int | None:
    """The live process a daemon's pid file names, if it is still that daemon."""
    try:
        pid = int(path.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    daemon = path.stem.split("-")[0]  # slurmctld, slurmd, munged, sshd
    return pid if comm == daemon else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


kill_pidfile = kill_pidfiles  # one pid file


def wait_for(what: str, probe, timeout: float = 60, every: float = 0.5):
    deadline = time.time() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


_lock_depth = 0


@contextlib.contextmanager
def cluster_lock(timeout: float = 900):
    """One test session at a time uses these pieces (they share names and /etc/hosts).
    Re-entrant within this process."""
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    with open(LOCK, "w") as f:
        wait_for(f"the lock {LOCK}", lambda: _try_lock(f), timeout=timeout, every=1)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


# --------------------------------------------------------------------------- ssh


def _ssh_dir() -> Path:
    return STATE / "ssh"


@contextlib.contextmanager
def ssh_keys():
    """A client key, our sshd's host key and authorized_keys under STATE, and a client config
    (/etc/ssh/ssh_config.d, read by every ssh) that uses them for localhost and the test hosts
    without host-key prompts. Removed on exit; root's own ~/.ssh is not touched."""
    d = _ssh_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for key in ("id_ed25519", "host_ed25519"):
        if not (d / key).exists():
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)])
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    names = " ".join(["localhost", "127.0.0.1"])
    others = " ".join([h.name for h in HOSTS] + [h.addr for h in HOSTS])
    common = (f"    IdentityFile {d / 'id_ed25519'}\n    IdentitiesOnly yes\n    StrictHostKeyChecking no\n"
              "    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n    BatchMode yes\n")
    SSH_CLIENT_CONF.parent.mkdir(parents=True, exist_ok=True)
    SSH_CLIENT_CONF.write_text(f"{MARK}: written and removed by tests/cluster/hosts.py\n"
                               f"Host {names}\n    Port {LOCAL_SSH_PORT}\n{common}Host {others}\n{common}")
    (d / "sshd_config").write_text(
        f"HostKey {d / 'host_ed25519'}\nAuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPrintMotd no\nSubsystem sftp internal-sftp\n")
    try:
        yield d
    finally:
        SSH_CLIENT_CONF.unlink(missing_ok=True)


def start_sshd(listen: str, port: int, pidfile: Path, host: Host | None = None) -> None:
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    cmd = ["/usr/sbin/sshd", "-f", str(_ssh_dir() / "sshd_config"), "-o", f"ListenAddress={listen}",
           "-o", f"Port={port}", "-o", f"PidFile={pidfile}", "-E", str(pidfile.with_suffix(".log"))]
    sh(host.wrap(cmd) if host else cmd)
    wait_for(f"sshd on {listen}:{port}", lambda: pidfile.exists(), timeout=20)


@contextlib.contextmanager
def local_sshd():
    """sshd on 127.0.0.1:LOCAL_SSH_PORT (the DeepSpeed launcher checks `ssh localhost hostname`)."""
    pidfile = STATE / "sshd-local.pid"
    kill_pidfile(pidfile)
    start_sshd("127.0.0.1", LOCAL_SSH_PORT, pidfile)
    try:
        wait_for("ssh localhost", lambda: sh(["ssh", "localhost", "true"], check=False, timeout=20).returncode == 0,
                 timeout=20)
        yield
    finally:
        kill_pidfile(pidfile)


# --------------------------------------------------------------------------- namespace hosts


def _etc_hosts_remove() -> None:
    path = Path("/etc/hosts")
    lines = path.read_text().splitlines(keepends=True)
    kept = [l for l in lines if MARK not in l]
    if kept != lines:
        path.write_text("".join(kept))  # in place: /etc/hosts may be a bind mount


def netns_down() -> None:
    """Remove every trace of netns_hosts (also what a killed run left)."""
    kill_pidfiles(*(STATE / f"sshd-{h.name}.pid" for h in HOSTS))
    for h in HOSTS:
        if Path(f"/run/netns/{h.netns}").exists():
            # what our tests started on this host and left running (a job killed by a timeout)
            for pid in sh(["ip", "netns", "pids", h.netns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh(["ip", "netns", "del", h.netns], check=False)
    sh(["ip", "link", "del", VETH[0]], check=False)
    _etc_hosts_remove()


@contextlib.contextmanager
def netns_hosts():
    """Two hosts, node-a (10.77.0.1) and node-b (10.77.0.2): network namespaces joined by a veth
    pair, each with its own hostname and an sshd; the filesystem is shared as on a cluster.
    Needs ssh_keys() around it."""
    netns_down()
    try:
        for h in HOSTS:
            sh(["ip", "netns", "add", h.netns])
        sh(["ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]])
        for h, veth in zip(HOSTS, VETH):
            sh(["ip", "link", "set", veth, "netns", h.netns])
            sh(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", veth])
            sh(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            sh(["ip", "-n", h.netns, "link", "set", veth, "up"])
        with open("/etc/hosts", "a") as f:
            for h in HOSTS:
                f.write(f"{h.addr} {h.name}  {MARK}\n")
        for h in HOSTS:
            start_sshd(h.addr, 22, STATE / f"sshd-{h.name}.pid", host=h)
        a, b = HOSTS
        wait_for("ssh node-a -> node-b", lambda: sh(a.wrap(["ssh", b.name, "hostname"]), check=False,
                                                   timeout=20).stdout.strip() == b.name, timeout=30)
        yield HOSTS
    finally:
        netns_down()


# --------------------------------------------------------------------------- munge + Slurm


JOB_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
             "DEADLINE")  # the JobStates of a job that has ended


@dataclass
class SlurmCluster:
    """A running Slurm cluster; `run` executes a client command (sbatch, srun, ...) against it."""

    dir: Path
    nodes: list[str]
    submit_host: Host | None  # where client commands run (None: this machine)
    env: dict = field(default_factory=dict)
    pidfiles: list[Path] = field(default_factory=list)

    def run(self, cmd: list[str], timeout: float = 300, check: bool = False, cwd=None) -> subprocess.CompletedProcess:
        full = self.submit_host.wrap(cmd) if self.submit_host else cmd
        return sh(full, timeout=timeout, check=check, env=self.env, cwd=cwd)

    def submit(self, args: list[str], cwd=None) -> str:
        """`sbatch --parsable ARGS`; returns the job id."""
        p = self.run(["sbatch", "--parsable", *args], timeout=30, cwd=cwd)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed: {p.stdout}{p.stderr}")
        return p.stdout.strip().split(";")[0]

    def job_fields(self, job: str) -> dict:
        """scontrol's fields of the job (JobState, ExitCode, Restarts, ...)."""
        q = self.run(["scontrol", "-o", "show", "job", job], timeout=20)
        return dict(kv.split("=", 1) for kv in q.stdout.split() if "=" in kv)

    def submit_and_wait(self, args: list[str], timeout: float, cwd=None) -> tuple[str, dict]:
        """`submit`, then poll the job every second until it ends (faster than `sbatch --wait`,
        which backs off to long sleeps); returns (job id, scontrol's fields)."""
        job = self.submit(args, cwd=cwd)

        def done():
            fields = self.job_fields(job)
            return fields if fields.get("JobState") in JOB_ENDED else None

        try:
            return job, wait_for(f"Slurm job {job}", done, timeout=timeout, every=1)
        except TimeoutError:
            self.run(["scancel", job], timeout=20)
            raise

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        out = []
        for p in sorted(self.dir.glob("*.log")):
            out.append(f"--- {p.name}\n" + p.read_text()[-3000:])
        return "\n".join(out)


def _munge_up(d: Path) -> Path:
    """A private munged (own key and socket under d); returns its socket."""
    key, sock, pid = d / "munge.key", d / "munge.socket", d / "munged.pid"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    kill_pidfile(pid)
    sh(["munged", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={pid}",
        f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munge.seed'}"])
    wait_for("munged", lambda: sock.exists(), timeout=20)
    return sock


def _slurm_conf(d: Path, ctld: tuple[str, str], nodes: list[tuple[str, str]], sock: Path) -> Path:
    node_lines = "\n".join(
        f"NodeName={n} NodeAddr={a} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN"
        for n, a in nodes)
    conf = d / "slurm.conf"
    conf.write_text(f"""# written by tests/cluster/hosts.py
ClusterName=fdlora-test
# Job ids start afresh with each test cluster (its state directory is new). MPICH names its
# shared-memory segments after the PMI job id (/dev/shm/mpich_shm_*), and a segment left by a
# killed job of an earlier cluster with the same id makes MPI_Init fail ("Out of memory") or hang.
FirstJobId={random.randrange(1000, 60_000_000)}
SlurmctldHost={ctld[0]}({ctld[1]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
""")
    return conf


def _slurm_stop(d: Path) -> None:
    conf = d / "slurm.conf"
    if conf.exists() and _daemon_pid(d / "slurmctld.pid") is not None:  # scancel waits long on a dead controller
        with contextlib.suppress(subprocess.TimeoutExpired):
            sh(["scancel", "--full", "--partition=debug"], check=False, timeout=20,
               env={**os.environ, "SLURM_CONF": str(conf)})
    kill_pidfiles(*sorted(d.glob("slurmd-*.pid")), d / "slurmctld.pid")
    # A step that outlived its cluster (scancel could not end it) reports to the next cluster's
    # controller, which then drains the node ("Kill task failed") and every later job waits.
    sh(["pkill", "-KILL", "-x", "slurmstepd"], check=False)
    kill_pidfiles(d / "munged.pid")  # last: the Slurm daemons authenticate through it until they stop


@contextlib.contextmanager
def slurm(hosts: tuple[Host, ...] | None = None):
    """A Slurm cluster: without hosts, one node (this machine, as notes/slurm.md); with hosts,
    slurmctld on the first and one slurmd per host (notes/multinode-netns.md). Private munged,
    config and state under STATE; clients find the config through SLURM_CONF."""
    name = "slurm-netns" if hosts else "slurm-local"
    d = STATE / name
    _slurm_stop(d)
    if d.exists():
        shutil.rmtree(d)
    (d / "state").mkdir(parents=True)
    try:
        sock = _munge_up(d)
        if hosts:
            conf = _slurm_conf(d, (hosts[0].name, hosts[0].addr), [(h.name, h.addr) for h in hosts], sock)
        else:
            me = socket.gethostname().split(".")[0]
            conf = _slurm_conf(d, (me, "127.0.0.1"), [(me, "127.0.0.1")], sock)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        if hosts:
            sh(hosts[0].wrap(["slurmctld"]), env=env)
            for h in hosts:
                sh(h.wrap(["slurmd", "-N", h.name]), env=env)
            nodes = [h.name for h in hosts]
        else:
            sh(["slurmctld"], env=env)
            sh(["slurmd", "-N", me], env=env)
            nodes = [me]
        cluster = SlurmCluster(d, nodes, hosts[0] if hosts else None, env)

        def idle() -> bool:
            p = cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20)
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            return p.returncode == 0 and len(states) == len(nodes) and all(s == "idle" for s in states.values())

        try:
            wait_for(f"Slurm nodes {nodes} idle", idle, timeout=60)
        except TimeoutError as e:
            raise RuntimeError(f"{e}\n{cluster.logs()}") from None
        yield cluster
    finally:
        _slurm_stop(d)


def down() -> None:
    """Remove everything these helpers may have left behind."""
    for name in ("slurm-netns", "slurm-local"):
        _slurm_stop(STATE / name)
    netns_down()
    kill_pidfile(STATE / "sshd-local.pid")
    SSH_CLIENT_CONF.unlink(missing_ok=True)
    shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["down"]:
        down()
    else:
        sys.exit("usage: python tests/cluster/hosts.py down")
