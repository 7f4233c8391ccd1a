#!/usr/bin/env bash
# Install what the launch tests start for real: Slurm + munge, an sshd, iproute2 (network
# namespaces), util-linux (nsenter, unshare), and Open MPI beside the pip `mpich` wheel
# (openmpi-bin: /usr/bin/mpirun, ompi_info, libmpi.so.40; libpmix-dev: the unversioned
# libpmix.so that Slurm's mpi/pmix plugin opens, so that `srun --mpi=pmix` works).
# Debian/Ubuntu, as root; idempotent: does nothing when every command and file is already there.
# Without root or apt-get it only says so (the tests then skip with the reason).
#   tests/cluster/install.sh
set -euo pipefail

need=(slurmctld slurmd sbatch srun munged sshd ssh ssh-keygen ip nsenter unshare
      /usr/bin/mpirun.openmpi ompi_info "/usr/lib/*/pmix2/lib/libpmix.so")
missing=()
for c in "${need[@]}"; do
    command -v "$c" >/dev/null 2>&1 || [[ -x "/usr/sbin/$c" ]] || compgen -G "$c" >/dev/null || missing+=("$c")
done
if [[ ${#missing[@]} == 0 ]]; then
    echo "tests/cluster/install.sh: all present (${need[*]})"
    exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tests/cluster/install.sh: missing ${missing[*]}; not root or no apt-get, so not installing" \
         "(the launch tests will skip)" >&2
    exit 0
fi
cmd=(apt-get install -y -q --no-install-recommends slurm-wlm munge openssh-server openssh-client iproute2 util-linux procps
     openmpi-bin libpmix-dev)
echo "+ apt-get update -q && ${cmd[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive "${cmd[@]}"
