#!/usr/bin/env bash
# Every rank of a job with the DeepSpeed launcher and a hostfile (hostfiles/).
#
#   launch/deepspeed.sh                                          # the demo on this machine
#   HOSTFILE=hostfiles/netns-2hosts CONFIG=configs/x.yaml launch/deepspeed.sh --set train.rounds=5
#   HOSTFILE=hostfiles/2nodes-8gpus CONFIG=configs/my.yaml DS_LAUNCHER=openmpi launch/deepspeed.sh
#
# Our ranks must form ONE MPI world (COMM_WORLD is split into clients and the federation), so the
# launcher must be an MPI one: `--launcher mpich` or `--launcher openmpi`. On a hostfile with ONE
# host, DeepSpeed ignores that choice and spawns the ranks itself unless `--force_multi` is given;
# this script adds it. `--launcher pdsh` never gives an MPI world; the job then stops at start
# with a message saying how to launch instead.
# DeepSpeed first checks `ssh <host> hostname` for every host of the hostfile (localhost too), so
# passwordless ssh must work to each one, and every host must see the same paths.
# The hostfile's slots must add up to 1 + sum(topology.clients); its MPICH runner also wants the
# same slots on every host. Rank r goes to the host that holds slot r, in hostfile order.
#
# Knobs (environment):
#   CONFIG       the run config (default configs/demo.yaml)
#   OUTPUT       the run directory (default: the config's output_dir)
#   HOSTFILE     DeepSpeed hostfile, `host slots=N` per line (default hostfiles/localhost-5)
#   DS_LAUNCHER  mpich | openmpi (default mpich)
#   MASTER_ADDR  passed to deepspeed (default: the hostfile's first host). Our clients build their
#                own torch.distributed worlds, so this is only DeepSpeed's bookkeeping.
#   DS_ARGS      extra deepspeed flags
# Open MPI only (DS_LAUNCHER=openmpi). DeepSpeed runs `mpirun` from PATH, so the script puts the
# directory of `ompi_info` first on PATH (the pip mpich wheel has an `mpirun` of its own), and
# writes mpirun's flags into --launcher_args:
#   TCP_IF       the network for MPI's TCP traffic: interface(s) or a subnet, e.g. ib0 or
#                10.0.0.0/16 (default: lo for a one-host hostfile, else eth0, DeepSpeed's default)
#   MPI_ARGS     more mpirun flags. Remote ranks get only the variables named by -x (and DeepSpeed's
#                own list); the script adds -x for each variable of OPENMPI_FORWARD in common.sh
#                that is set (PATH, LD_LIBRARY_PATH, PYTHONPATH, CUDA_VISIBLE_DEVICES, ...).
#   FDLORA       the entry point (default: fdlora-cluster on PATH, as an absolute path)
#   DRY_RUN      1 = print the command only
# Arguments: passed on to `fdlora-cluster run` (e.g. --set train.rounds=5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # fdlora_bin, world_size, openmpi_bin, openmpi_forward

CONFIG=${CONFIG:-configs/demo.yaml}
OUTPUT=${OUTPUT:-}
HOSTFILE=${HOSTFILE:-hostfiles/localhost-5}
DS_LAUNCHER=${DS_LAUNCHER:-mpich}
DS_ARGS=${DS_ARGS:-}
TCP_IF=${TCP_IF:-}
MPI_ARGS=${MPI_ARGS:-}
DRY_RUN=${DRY_RUN:-0}
fdlora_bin
[[ -f "$HOSTFILE" ]] || { echo "hostfile $HOSTFILE not found (see hostfiles/)" >&2; exit 2; }
case "$DS_LAUNCHER" in
    mpich|openmpi) ;;
    *) echo "DS_LAUNCHER=$DS_LAUNCHER: only mpich and openmpi give the one MPI world this job needs" >&2; exit 2 ;;
esac

hosts=$(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
slots=$(awk '!/^[[:space:]]*(#|$)/ {split($2, s, "="); n += s[2]} END {print n + 0}' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$(head -1 <<<"$hosts")}
world=$(world_size "$CONFIG" "$@")
if [[ "$slots" != "$world" ]]; then
    echo "$HOSTFILE has $slots slots, but $CONFIG needs world=$world ranks (1 server + client ranks):" \
         "make the slots add up to $world, or change topology.clients" >&2
    exit 2
fi
[[ -n "$OUTPUT" ]] && set -- --output "$OUTPUT" "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEEPSPEED=$(command -v deepspeed || true)
[[ -n "$DEEPSPEED" ]] || { echo "deepspeed not found: activate the virtualenv" >&2; exit 2; }
nhosts=$(wc -l <<<"$hosts")

cmd=("$DEEPSPEED" --hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER" --master_addr "$MASTER_ADDR")
(( nhosts == 1 )) && cmd+=(--force_multi)  # one host: else no MPI world
if [[ "$DS_LAUNCHER" == openmpi ]]; then
    ompi_bin=$(openmpi_bin DS_LAUNCHER=openmpi)
    export PATH="$ompi_bin:$PATH"  # DeepSpeed's `mpirun`: Open MPI's, not the mpich wheel's
    export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
    TCP_IF=${TCP_IF:-$( (( nhosts == 1 )) && echo lo || echo eth0)}
    mpi_args="--mca btl_tcp_if_include $TCP_IF"
    openmpi_forward
    mpi_args+=" ${OPENMPI_X[*]}"
    cmd+=(--launcher_args "$mpi_args${MPI_ARGS:+ $MPI_ARGS}")
fi
# The user script is the console script itself (a Python file): DeepSpeed's MPI runners run
# `python -u SCRIPT ARGS` on every rank; its --module flag breaks with the mpich runner.
eval "extra=($DS_ARGS)"  # a list of flags, with shell quoting (--launcher_args "...")
cmd+=("${extra[@]}" "$FDLORA" run "$CONFIG" "$@")
echo "+ ${cmd[*]}"
[[ "$DRY_RUN" == 1 ]] && exit 0
exec "${cmd[@]}"
