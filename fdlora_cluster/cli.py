"""`fdlora-cluster`: run (one rank), launch (all ranks on this machine), check (config + topology),
pretrain (the tiny demo base), report (a run's Markdown report and plots).

    fdlora-cluster launch configs/demo.yaml --output runs/demo
    mpiexec -n 5 fdlora-cluster run configs/demo.yaml --set train.rounds=5
    mpiexec -n 5 fdlora-cluster run configs/demo.yaml --probe   # the launch only, no model (probe.py)
    fdlora-cluster check configs/fdlora.yaml
    fdlora-cluster pretrain configs/demo.yaml
    fdlora-cluster report runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings

from .config import ConfigError, check_environment, deepspeed_dict, load_config
from .topology import RankPlan, TopologyError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--output", help="run directory (overrides output_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value (YAML syntax), repeatable")


def _add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="auto|RUN_DIR|CHECKPOINT",
                   help="continue from a checkpoint: `auto` = the newest complete one in the run directory "
                        "(none yet: start from the beginning), RUN_DIR = its newest one, or one "
                        "RUN_DIR/checkpoints/round-<k> directory (docs/RELIABILITY.md)")


def _add_probe_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="store_true",
                   help="check the launch, build no model: topology, client worlds, one federation round "
                        "trip of a small tensor, digests on every rank (fdlora_cluster/probe.py)")


def _resume_run_dir(resume: str | None) -> str | None:
    """The run directory a `--resume RUN_DIR|CHECKPOINT` names (it becomes output_dir)."""
    if not resume or resume == "auto":
        return None
    path = os.path.normpath(resume)
    if os.path.basename(path).startswith("round-"):
        return os.path.dirname(os.path.dirname(path))
    return path


def _load(args):
    overrides = list(args.overrides)
    output = getattr(args, "output", None) or _resume_run_dir(getattr(args, "resume", None))
    if output:
        overrides.append(f"output_dir={json.dumps(output)}")  # quoted: a path, never YAML (2024, ~, yes)
    return load_config(args.config, overrides)


def _load_or_report(args, environment: bool = True):
    """The config, or None after printing why it cannot be used (single-process commands). With
    `environment`, also what this Python lacks for it (config.check_environment)."""
    try:
        cfg = _load(args)
        if environment:
            check_environment(cfg, args.config)
        return cfg
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def check_data(cfg) -> list:
    """Every client's rows, read and split as the ranks will read them (data.load_clients), and
    every response checked against train.max_seq_len: in this one process, before any rank starts,
    so that a bad line is said once, in seconds, and not by every rank of a started job."""
    from .data import check_responses_fit, get_tokenizer, load_clients

    clients = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed, announce=False)
    tok = get_tokenizer(cfg.model.path)
    for data in clients:
        check_responses_fit(tok, data, cfg.train.max_seq_len)
    return clients


def _load_and_check_data(args):
    """(config, its clients' data) when the config, its environment and the data are usable, else
    (None, None) after printing why not."""
    from .data import DataError

    cfg = _load_or_report(args)
    if cfg is None:
        return None, None
    try:
        return cfg, check_data(cfg)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return None, None


def cmd_check(args) -> int:
    from .data import describe_clients

    if args.world_size:  # for the launch scripts (launch/common.sh): the number alone, from the config alone
        cfg = _load_or_report(args, environment=False)
        if cfg is None:
            return 2
        print(RankPlan(tuple(cfg.client_sizes())).world_size)
        return 0
    cfg, clients = _load_and_check_data(args)
    if cfg is None:
        return 2
    plan = RankPlan(tuple(cfg.client_sizes()))
    print(f"config {args.config}: OK")
    print(f"strategy {cfg.strategy}, {cfg.train.rounds} rounds, seed {cfg.seed}, output {cfg.output_dir}")
    print(plan.describe())
    if any(d.name is not None for d in clients):
        print(f"data: client names -> indices: {describe_clients(clients)}")
    print(f"{'client':<8}{'ranks':<12}{'leader':<8}{'ZeRO':<6}{'micro':<7}{'K':<4}{'lr':<8}"
          f"rows (train/few-shot/test)")
    for c in range(plan.num_clients):
        ds = deepspeed_dict(cfg, c)
        r = plan.client_ranks(c)
        print(f"{c:<8}{f'{r[0]}-{r[-1]}':<12}{r[0]:<8}{ds['zero_optimization'].get('stage', 0):<6}"
              f"{ds['train_micro_batch_size_per_gpu']:<7}{cfg.inner_steps(c):<4}{ds['optimizer']['params']['lr']:<8g}"
              f"{len(clients[c].train)}/{len(clients[c].fewshot)}/{len(clients[c].test)}")
    if cfg.privacy is not None:
        from .dp import epsilon

        p = cfg.privacy
        print(f"privacy: clip_norm {p.clip_norm:g}, noise multiplier {p.noise_multiplier:g}: epsilon "
              f"{epsilon(p.noise_multiplier, cfg.train.rounds, p.delta, p.accountant):.4g} at delta {p.delta:g} after "
              f"{cfg.train.rounds} rounds ({p.accountant} accountant)")
    print(f"launch with: mpiexec -n {plan.world_size} fdlora-cluster run {args.config}")
    return 0


# Which MPI started this rank, told by the variables each launcher sets in every rank it starts:
# (variable, MPI, its libmpi soname). Open MPI's mpirun sets OMPI_COMM_WORLD_SIZE (and PMIX_RANK);
# MPICH's Hydra sets PMI_SIZE; srun --mpi=pmix sets only PMIX_RANK, and PMIx is Open MPI's way of
# starting ranks (the pip mpich wheel does not speak it). The first match wins.
_LAUNCHER_MPI = (("OMPI_COMM_WORLD_SIZE", "Open MPI", "libmpi.so.40"),
                 ("PMI_SIZE", "MPICH", "libmpi.so.12"),
                 ("PMIX_RANK", "Open MPI", "libmpi.so.40"))


def select_mpi_library(env=None) -> str | None:
    """Point mpi4py at the MPI of the launcher that started this rank; returns what was chosen.

    The mpi4py wheel (4.1+) carries one extension per MPI ABI (MPI.mpich.*.so, MPI.openmpi.*.so)
    and loads the first libmpi it finds, the pip `mpich` wheel's (next to this Python) before the
    system's, even when Open MPI's mpirun started the rank, which then is a world of its own. So
    when the environment names the launcher's MPI, the user chose no library (MPI4PY_MPIABI and
    MPI4PY_LIBMPI unset) and mpi4py is that wheel, set MPI4PY_LIBMPI to the first of this
    Python's lib/<soname> (an MPI wheel in the virtualenv) and <soname> on the loader's path (the
    system's or a `module load`ed MPI) that loads. When none loads, mpi4py's own search stands,
    and a rank left alone says so at start (topology._launcher_hint). A site-built mpi4py (one
    extension, linked to one MPI) is left alone."""
    env = os.environ if env is None else env
    if env.get("MPI4PY_MPIABI") or env.get("MPI4PY_LIBMPI"):
        return None  # the user's choice
    launcher = next(((var, mpi, so) for var, mpi, so in _LAUNCHER_MPI if var in env), None)
    if launcher is None:
        return None
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("mpi4py")
    where = os.path.dirname(spec.origin) if spec and spec.origin else ""
    names = os.listdir(where) if os.path.isdir(where) else []
    if not all(any(n.startswith(f"MPI.{abi}.") for n in names) for abi in ("mpich", "openmpi")):
        return None  # not the multi-ABI wheel
    var, mpi, soname = launcher
    for lib in (os.path.join(sys.prefix, "lib", soname), soname):
        try:
            ctypes.CDLL(lib, os.RTLD_LOCAL).MPI_Get_version  # mpi4py reopens the same library
        except (OSError, AttributeError):
            continue
        env["MPI4PY_LIBMPI"] = lib
        return f"{mpi} ({var} is set): MPI4PY_LIBMPI={lib}"
    return None


def cmd_run(args) -> int:
    """The per-rank entry point (mpiexec, srun, or the DeepSpeed launcher start one per rank)."""
    chosen = select_mpi_library()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, gloo inside clients
    # DeepSpeed calls a torch collective that torch marks deprecated, once per step and rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # peft 0.21 reads model.is_gradient_checkpointing, which transformers 5.x marks deprecated:
    # one warning per rank and adapter on the console, nothing for a user to act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:  # no loadable MPI library: say which was tried
        why = f"chosen for the launcher: {chosen}" if chosen else "MPI4PY_MPIABI / MPI4PY_LIBMPI, or mpi4py's search"
        print(f"mpi error: mpi4py could not load its MPI library ({why}): {e}\nSet MPI4PY_LIBMPI to the libmpi "
              "of the MPI whose launcher starts the ranks (docs/LAUNCH.md, 'Which MPI library').", file=sys.stderr)
        return 2

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    cfg, error = _before_start(args, rank)
    # Every rank checked the config and its data; agree on the outcome so that no rank waits on a
    # failed one, and say each error once (every client rank reads the same files).
    errors = world.allgather(error)
    if any(errors):
        if rank == 0:
            for e in dict.fromkeys(x for x in errors if x):
                print(e, file=sys.stderr)
        return 2
    from .log import capture_output, console_err

    def say(text: str) -> None:
        """An error: on the console, and in the rank's log file."""
        for f in (console_err(), sys.stderr):
            f.write(text if text.endswith("\n") else text + "\n")
            f.flush()

    try:
        # From here on what the libraries print (DeepSpeed's info lines, progress
        # bars, warnings; from the import of train on) goes to this rank's log file; the console
        # gets our own lines and every error (log.py says which lines go where).
        capture_output(os.path.join(cfg.output_dir, "logs", f"rank-{rank}.log"))
        if getattr(args, "probe", False):
            from . import probe

            probe.run(cfg)
        else:
            from . import train

            train.run(cfg, resume=args.resume)
    except TopologyError as e:
        # Raised before any communication, the same on every rank (the world does not fit the
        # config, or no MPI world at all): say it once, without a traceback, and exit like a config error.
        if rank == 0:
            say(f"topology error: {e}")
        return 2
    except BaseException as e:  # any failure ends the whole job promptly, with its cause on the console
        # BaseException: a sys.exit() or Ctrl-C in the middle of the job must not leave this rank
        # finalising MPI while the others wait on it forever.
        what = f"exited early (SystemExit {e.code})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        say(f"[rank {rank}] error: {what}")
        if isinstance(e, Exception) and not isinstance(e, _user_errors()):  # user errors: the message says it all
            say(traceback.format_exc())
        if world.Get_size() > 1:
            # MPI_Abort tears the whole job down at once, and the launcher may not yet have forwarded
            # this rank's last console lines (the error above) from its pipe: give it a moment.
            time.sleep(1.0)
            world.Abort(1)
        return 1
    return 0


def _before_start(args, rank: int):
    """(config, None), or (None, the error) when this rank cannot start: the config; on a client
    rank its data, read now for the trainer (data.preload_clients), and its client's responses
    against train.max_seq_len; what this rank's role needs installed (the server's trackers; a
    client's transformers, nevergrad, datasets: config.check_environment; last, as it imports
    them). Rank 0 is the server (topology.RankPlan)."""
    from .data import DataError, check_responses_fit, get_tokenizer, preload_clients
    from .model import missing_pretrained

    try:
        cfg = _load(args)
        if rank != 0:
            clients = preload_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)
            client = RankPlan(tuple(cfg.client_sizes())).client_of(rank)
            if client is not None:  # None: a world larger than the config, which train.run refuses
                check_responses_fit(get_tokenizer(cfg.model.path), clients[client], cfg.train.max_seq_len)
            missing = missing_pretrained(cfg.model)
            if missing:
                raise ConfigError(f"{missing} (`fdlora-cluster launch` does)")
        check_environment(cfg, args.config, roles=("server",) if rank == 0 else ("client",))
        return cfg, None
    except ConfigError as e:
        return None, f"config error: {e}"
    except DataError as e:
        return None, f"data error: {e}"
    except Exception as e:  # a bug: still answer the allgather, so that no rank waits on this one
        return None, f"[rank {rank}] error: {type(e).__name__}: {e}\n{traceback.format_exc()}"


def _user_errors() -> tuple[type, ...]:
    from .data import DataError
    from .rendezvous import RendezvousError
    from .checkpoint import CheckpointWriteError, ResumeError
    from .server import FederationError
    from .transport import FederationAborted

    return (DataError, RendezvousError, ConfigError, FederationError, FederationAborted, ResumeError,
            CheckpointWriteError)


def find_mpiexec(explicit: str | None = None) -> str:
    """mpiexec next to this Python (the pip `mpich` wheel puts one there), else on PATH."""
    if explicit:
        return explicit
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here):
        return here
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise FileNotFoundError("no mpiexec found: `pip install mpich` (or load your cluster's MPI module)")
    return found


def cmd_launch(args) -> int:
    """All ranks of the config's topology on this machine, through the environment's mpiexec."""
    cfg, _ = _load_and_check_data(args)  # a config or data error: said once, before the ranks start
    if cfg is None:
        return 2
    n = cfg.world_size()
    env = dict(os.environ)
    # n processes share this machine's cores; unbounded intra-op threads only fight each other.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    # Open MPI's mpirun (harmless for MPICH): it refuses to start as root without these two, and
    # refuses more ranks than cores unless told to oversubscribe (this machine is all we have).
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    # Under mpiexec the server's stdout is a pipe even on a terminal: tell it whether this one is
    # (its progress bar or one line per round, log.use_bar).
    env.setdefault("FDLORA_CONSOLE_TTY", "1" if sys.stdout.isatty() else "0")
    from .pretrain import ensure_pretrained

    if not args.probe:  # a probe builds no model
        ensure_pretrained(cfg)  # in this one process, with every core, before the ranks start
    cmd = [find_mpiexec(args.mpiexec), "-n", str(n), sys.executable, "-m", "fdlora_cluster.cli", "run", args.config]
    if args.output:
        cmd += ["--output", args.output]
    if args.resume:
        cmd += ["--resume", args.resume]
    if args.probe:
        cmd += ["--probe"]
    for o in args.overrides:
        cmd += ["--set", o]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def cmd_pretrain(args) -> int:
    """Pretrain the tiny base of `model.config` on the scenario's general text into `model.pretrained`."""
    cfg = _load_or_report(args)
    if cfg is None:
        return 2
    if cfg.model.config is None or not cfg.model.pretrained:
        print("pretrain: this config has no model.config + model.pretrained (a real checkpoint needs no pretraining)",
              file=sys.stderr)
        return 2
    from .pretrain import pretrain

    pretrain(cfg, force=args.force)
    return 0


def cmd_report(args) -> int:
    """Write REPORT.md and PNG plots for one run directory (or a comparison of several)."""
    from .report import ReportError, write_report

    try:
        path = write_report(args.run_dirs, out_dir=args.out)
    except ReportError as e:
        print(f"report error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    """One client's adapter as a PEFT directory, or merged into the base (docs/SERVING.md)."""
    from .export import ExportError, export

    try:
        info = export(args.run_dir, args.client, args.out, adapter=args.adapter, merge=args.merge)
    except ExportError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    head = f"wrote {args.out}: client {args.client}'s {args.adapter} adapter"
    if args.merge:
        print(f"{head} merged into the base ({info['base']}): a plain Hugging Face checkpoint")
    else:
        print(f"{head}, LoRA rank {info['r']} (a multi-LoRA server needs max LoRA rank >= {info['r']}); "
              f"its base checkpoint: {info['base_checkpoint']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fdlora-cluster", description=__doc__.splitlines()[0])
    # The DeepSpeed launcher's own spawning puts --local_rank=N right after the script, before
    # `run`; accepted here (and after `run`) and ignored, so that such a launch reaches the
    # topology check, which explains how to launch instead (topology._launcher_hint).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run this rank of the job (under mpiexec/srun/deepspeed)")
    _add_config_args(p)
    # The local rank comes from the topology (topology.place_gpus), never from this flag.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    _add_resume_arg(p)
    _add_probe_arg(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("launch", help="start every rank on this machine with mpiexec")
    _add_config_args(p)
    _add_resume_arg(p)
    _add_probe_arg(p)
    p.add_argument("--mpiexec", help="mpiexec to use (default: the one next to python, then PATH)")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("check", help="validate the config and print the topology; no training")
    _add_config_args(p)
    _add_resume_arg(p)  # accepted, so that a launch script can pass `run`'s arguments on to check
    _add_probe_arg(p)  # the same
    p.add_argument("--world-size", action="store_true",
                   help="print only the number of ranks the job needs, 1 + sum(topology.clients)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("pretrain", help="pretrain the tiny base of model.config once (cached in model.pretrained)")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="retrain even when the cached base is up to date")
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("report", help="write RUN_DIR/report/REPORT.md with the per-client table and plots")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory; several = a comparison")
    p.add_argument("--out", help="report directory (default: RUN_DIR/report, or ./report for several runs)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", help="one client's adapter for serving: a PEFT directory, or merged (--merge)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("--client", type=int, required=True, help="client id (0-based)")
    p.add_argument("--adapter", choices=("fused", "personal", "global"), default="fused")
    p.add_argument("--merge", action="store_true", help="merge into the base: a plain Hugging Face checkpoint")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
