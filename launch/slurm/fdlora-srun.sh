#!/usr/bin/env bash
# fdlora-cluster started by srun directly: from a login node (srun makes the allocation) or from
# inside `salloc`; the console stays in your terminal.
#
#   launch/slurm/fdlora-srun.sh                                       # the demo: 5 tasks, 1 node
#   NODES=2 CONFIG=configs/my.yaml SRUN_ARGS="--gpus-per-node=8 --time=2:00:00" launch/slurm/fdlora-srun.sh
#
# Knobs (environment):
#   CONFIG     the run config (default configs/demo.yaml)
#   OUTPUT     the run directory (default: the config's output_dir)
#   NODES      nodes (default 1)
#   NTASKS     tasks (default: 1 + sum(topology.clients), from `fdlora-cluster check --world-size`)
#   SRUN_MPI   srun's MPI plugin (default pmi2; `srun --mpi=list`)
#   SRUN_ARGS  extra srun flags: --partition, --time, --gpus-per-node (GPUs per node, not per
#              task: the server needs none; see fdlora.sbatch), --overcommit when tasks > CPUs
#   FDLORA     the entry point (default: fdlora-cluster on PATH, as an absolute path)
#   DRY_RUN    1 = print the command only
# Arguments: passed on to `fdlora-cluster run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"  # fdlora_bin, world_size

CONFIG=${CONFIG:-configs/demo.yaml}
OUTPUT=${OUTPUT:-}
NODES=${NODES:-1}
SRUN_MPI=${SRUN_MPI:-pmi2}
SRUN_ARGS=${SRUN_ARGS:-}
DRY_RUN=${DRY_RUN:-0}
fdlora_bin
NTASKS=${NTASKS:-$(world_size "$CONFIG" "$@")}
[[ -n "$OUTPUT" ]] && set -- --output "$OUTPUT" "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

eval "extra=($SRUN_ARGS)"
cmd=(srun --nodes="$NODES" --ntasks="$NTASKS" --mpi="$SRUN_MPI" --kill-on-bad-exit=1 "${extra[@]}"
     "$FDLORA" run "$CONFIG" "$@")
echo "+ ${cmd[*]}"
[[ "$DRY_RUN" == 1 ]] && exit 0
exec "${cmd[@]}"
