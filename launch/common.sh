# Helpers shared by the launch scripts: sourced by them, never run. Sourcing it only defines the
# functions below; each one either does its job or prints what is wrong and how to fix it, and
# exits the script with status 2. Call them after `set -euo pipefail` (and after VENV is active).
#
#   fdlora_bin            sets FDLORA, the entry point: as given, or fdlora-cluster found on PATH,
#                         as an absolute path (remote hosts and srun tasks run the same file)
#   world_size CONFIG [ARGS...]
#                         prints the number of ranks the job needs, 1 + sum(topology.clients), from
#                         `fdlora-cluster check CONFIG ARGS... --world-size` (ARGS: the run's own
#                         arguments, so a --set of topology.clients counts); on a config error that
#                         error is shown and the script stops, so nothing starts with an empty -n
#   require_ntasks WORLD  stops a Slurm job whose allocation (SLURM_NTASKS) is not WORLD tasks,
#                         naming the --ntasks to submit with (uses CONFIG for the message)
#   openmpi_bin WHO [FIX] prints Open MPI's bin directory (where ompi_info is); WHO (the knob that
#                         asked for Open MPI) and FIX (another way out) go into the error
#   find_mpiexec          sets MPIEXEC unless it is set: MPI=openmpi: Open MPI's mpirun; otherwise
#                         the mpiexec next to fdlora-cluster's Python (the pip mpich wheel in the
#                         virtualenv), else mpiexec or mpirun on PATH
#   mpi_kind              sets MPI (mpich | openmpi) unless it is set, from `$MPIEXEC --version`
#   openmpi_forward       sets OPENMPI_X to Open MPI's `-x VAR` flags for every variable of
#                         OPENMPI_FORWARD that is set: the one list of what remote ranks get
#   slurm_prelude         what every .sbatch does first: CONFIG and OUTPUT defaults, VENV activated,
#                         FDLORA, OMP_NUM_THREADS from --cpus-per-task, Open MPI allowed as root
#   remove_stale_mpich_shm
#                         removes this user's MPICH shared-memory segments on this node that no
#                         live process has mapped (what a killed job leaves in /dev/shm)
#
# Who uses what:
#   launch/mpirun.sh                    fdlora_bin, find_mpiexec (+ openmpi_bin), mpi_kind, world_size,
#                                       openmpi_forward
#   launch/deepspeed.sh                 fdlora_bin, world_size, openmpi_bin, openmpi_forward
#   launch/slurm/fdlora-srun.sh         fdlora_bin, world_size
#   launch/slurm/fdlora.sbatch          slurm_prelude, world_size, require_ntasks
#   launch/slurm/fdlora-requeue.sbatch  slurm_prelude, world_size, require_ntasks, remove_stale_mpich_shm
#   launch/slurm/fdlora-mpiexec.sbatch  slurm_prelude, find_mpiexec, mpi_kind, world_size, require_ntasks,
#                                       openmpi_forward
#
# How they find it: the .sh scripts beside themselves, `source "$(dirname "${BASH_SOURCE[0]}")/common.sh"`
# (../common.sh from launch/slurm/). sbatch runs a COPY of the batch script from Slurm's spool
# directory, so the .sbatch files look beside themselves (run with bash) and then under the submit
# directory, launch/common.sh: submit them from the repository root.
#
# A function that fails inside a command substitution only leaves that subshell; `n=$(world_size
# ...)` as a plain assignment still stops the script under `set -e` (`local n=$(...)` or
# `export n=$(...)` would hide the failure: assign first).

fdlora_bin() {
    if [[ -n "${FDLORA:-}" ]]; then
        command -v "$FDLORA" >/dev/null || { echo "FDLORA=$FDLORA: no such command" >&2; exit 2; }
        return 0
    fi
    FDLORA=$(command -v fdlora-cluster || true)
    [[ -n "$FDLORA" ]] || { echo "fdlora-cluster not found: activate the virtualenv (or set VENV) or set FDLORA" >&2; exit 2; }
}

world_size() {
    local config=$1 n
    shift
    # A config error is printed by check itself (stderr passes through); no number, no launch.
    if ! n=$("$FDLORA" check "$config" "$@" --world-size); then
        echo "cannot size the job: \`$FDLORA check $config $*\` failed (above)" >&2
        exit 2
    fi
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "cannot size the job: \`$FDLORA check --world-size\` printed '$n', not a number" >&2; exit 2; }
    echo "$n"
}

require_ntasks() {
    local world=$1
    if [[ "${SLURM_NTASKS:-}" != "$world" ]]; then
        echo "$CONFIG needs $world tasks (1 server + client ranks), the job has ${SLURM_NTASKS:-none}:" \
             "submit with --ntasks=$world" >&2
        exit 2
    fi
}

openmpi_bin() {
    local ompi_info
    ompi_info=$(command -v ompi_info || true)
    [[ -n "$ompi_info" ]] || { echo "$1: ompi_info is not on PATH; put Open MPI's bin on PATH${2:+ or $2}" >&2; exit 2; }
    dirname "$ompi_info"
}

find_mpiexec() {
    if [[ -z "${MPIEXEC:-}" && "${MPI:-}" == openmpi ]]; then
        MPIEXEC=$(openmpi_bin MPI=openmpi "set MPIEXEC")/mpirun
    fi
    if [[ -z "${MPIEXEC:-}" ]]; then
        # fdlora-cluster's shebang names its Python; an mpiexec beside it is the virtualenv's own.
        local py_bin
        py_bin=$(dirname "$(head -1 "$(command -v "$FDLORA")" 2>/dev/null | sed 's/^#!//')")
        MPIEXEC=$( { [[ -x "$py_bin/mpiexec" ]] && echo "$py_bin/mpiexec"; } || command -v mpiexec || command -v mpirun || true)
    fi
    [[ -n "$MPIEXEC" ]] || { echo "no mpiexec found: pip install mpich, or load your cluster's MPI module (module load ...)" >&2; exit 2; }
}

mpi_kind() {
    if [[ -z "${MPI:-}" ]]; then
        if "$MPIEXEC" --version 2>&1 | grep -qiE "open ?mpi|openrte"; then MPI=openmpi; else MPI=mpich; fi
    fi
}

# Open MPI's remote ranks get only the variables named by -x (MPICH's Hydra and srun pass the whole
# environment): these, when set, for every script that starts ranks with Open MPI's mpirun.
OPENMPI_FORWARD=(PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS DS_ACCELERATOR FDLORA_RENDEZVOUS_ADDR
                 GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME CUDA_VISIBLE_DEVICES MPI4PY_MPIABI MPI4PY_LIBMPI)

openmpi_forward() {
    local v
    OPENMPI_X=()
    for v in "${OPENMPI_FORWARD[@]}"; do
        if [[ -n "${!v:-}" ]]; then OPENMPI_X+=(-x "$v"); fi
    done
}

slurm_prelude() {
    CONFIG=${CONFIG:-configs/demo.yaml}
    OUTPUT=${OUTPUT:-runs/${SLURM_JOB_NAME:-fdlora}-${SLURM_JOB_ID:-local}}
    if [[ -n "${VENV:-}" ]]; then source "$VENV/bin/activate"; fi
    fdlora_bin
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Open MPI refuses to start as root without these (harmless for MPICH and srun)
    export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-1}
}

remove_stale_mpich_shm() {
    # MPICH keeps a node's shared memory in /dev/shm/mpich_shm_*, named from the job's PMI name
    # (job and step id). A killed job leaves its segments there, and a requeued attempt (the same
    # job id, step ids from 0 again) opens the stale one and waits in MPI_Init forever. Only our
    # own files, and only those no process has mapped (a running job of ours keeps its segments).
    local mapped f n=0
    mapped=$(cat /proc/[0-9]*/maps 2>/dev/null | grep -o '/dev/shm/mpich_shm_[^ ]*' | sort -u || true)
    for f in /dev/shm/mpich_shm_*; do
        [[ -O "$f" ]] || continue
        grep -qxF "$f" <<<"$mapped" && continue
        rm -f "$f" && n=$((n + 1))
    done
    echo "$(hostname): removed $n stale MPICH shared-memory segment(s)"
}
