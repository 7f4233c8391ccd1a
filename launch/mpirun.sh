#!/usr/bin/env bash
# Every rank of a job with plain mpirun / mpiexec, on this machine or on a list of hosts.
#
#   launch/mpirun.sh                                        # the demo on this machine (5 ranks)
#   HOSTS=node-a:3,node-b:2 launch/mpirun.sh --set train.rounds=5
#   CONFIG=configs/my.yaml HOSTS=gpu1:8,gpu2:8 OUTPUT=runs/my launch/mpirun.sh
#
# Ranks fill the hosts in order: the first host's slots take ranks 0.., then the next host's.
# Rank 0 is the server; client i takes the next topology.clients[i] ranks, so a client may
# span two hosts (its leader then publishes a rendezvous address the other host can reach:
# set FDLORA_RENDEZVOUS_ADDR=<interface, e.g. eth0> if its host name resolves to loopback).
# All hosts must see the same paths (shared filesystem, same virtualenv), and this host must
# reach the others by passwordless ssh (MPICH's and Open MPI's default way to start remote ranks).
#
# Knobs (environment):
#   CONFIG   the run config (default configs/demo.yaml)
#   OUTPUT   the run directory (default: the config's output_dir)
#   HOSTS    host:slots,host:slots,...; empty = this machine only (default empty)
#   NP       number of ranks (default: 1 + sum(topology.clients), from `fdlora-cluster check --world-size`)
#   MPI      mpich | openmpi: which MPI starts the ranks (default: asked from `$MPIEXEC --version`)
#   MPIEXEC  the launcher (default: MPI=openmpi: the mpirun beside `ompi_info` on PATH; otherwise
#            mpiexec next to this Python (the pip mpich wheel), else mpiexec/mpirun on PATH)
#   MPI_ARGS extra launcher flags, e.g. "-iface eth0" (MPICH) or "--mca btl_tcp_if_include eth0" (Open MPI)
#   FDLORA   the entry point (default: fdlora-cluster on PATH, as an absolute path for remote hosts)
#   DRY_RUN  1 = print the command only
# Arguments: passed on to `fdlora-cluster run` (e.g. --set train.rounds=5).
#
# The flags this script writes, for reference (rank blocks stay contiguous per host):
#   MPICH:    mpiexec -n NP -hosts node-a:3,node-b:2 fdlora-cluster run CONFIG
#             (Hydra passes the whole environment to every rank; -genv K V sets one more)
#   Open MPI: mpirun -np NP --map-by slot --host node-a:3,node-b:2 -x PATH -x LD_LIBRARY_PATH
#             -x OMP_NUM_THREADS ... fdlora-cluster run CONFIG
#             (remote ranks get only the variables named by -x: OPENMPI_FORWARD in common.sh; as root mpirun also needs
#             OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; without HOSTS it may
#             start more ranks than cores: --oversubscribe, as MPICH does)
# Each rank's mpi4py loads the library of the MPI that started it (fdlora-cluster run reads the
# launcher's variables; MPI4PY_LIBMPI / MPI4PY_MPIABI, forwarded when set, override it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # fdlora_bin, find_mpiexec, mpi_kind, world_size, openmpi_forward

CONFIG=${CONFIG:-configs/demo.yaml}
OUTPUT=${OUTPUT:-}
HOSTS=${HOSTS:-}
MPI_ARGS=${MPI_ARGS:-}
DRY_RUN=${DRY_RUN:-0}
fdlora_bin
find_mpiexec
mpi_kind
NP=${NP:-$(world_size "$CONFIG" "$@")}
[[ -n "$OUTPUT" ]] && set -- --output "$OUTPUT" "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

case "$MPI" in
    mpich)
        cmd=("$MPIEXEC" -n "$NP")
        [[ -n "$HOSTS" ]] && cmd+=(-hosts "$HOSTS")
        ;;
    openmpi)
        export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
        cmd=("$MPIEXEC" -np "$NP" --map-by slot)
        if [[ -n "$HOSTS" ]]; then cmd+=(--host "$HOSTS"); else cmd+=(--oversubscribe); fi
        openmpi_forward  # -x for each variable of common.sh's OPENMPI_FORWARD that is set
        cmd+=("${OPENMPI_X[@]}")
        ;;
    *) echo "MPI=$MPI: expected mpich or openmpi" >&2; exit 2 ;;
esac
eval "extra=($MPI_ARGS)"  # a list of flags, with shell quoting (--launcher_args "...")
cmd+=("${extra[@]}" "$FDLORA" run "$CONFIG" "$@")
echo "+ ${cmd[*]}"
[[ "$DRY_RUN" == 1 ]] && exit 0
exec "${cmd[@]}"
