#!/usr/bin/env bash
# The GPU check: a few minutes on a machine with one (or more) NVIDIA GPUs.
#
#   bash bench/gpu_check.sh                      # everything below; one line per job, then the ratios
#   JOBS=3 OUTDIR=runs/gpu-check bash bench/gpu_check.sh
#
# What it runs (the demo, shortened: 2 rounds of 5 inner steps, 10 personal steps):
#   - NCCL inside the client, ZeRO-2 and ZeRO-3, fp32 and bf16 (DeepSpeed's bf16 section),
#     one client of one rank, under MPICH and under Open MPI;
#   - two one-rank clients sharing the GPU (topology.share_gpus: true), under both MPIs;
#   - the layouts placement must refuse on one GPU: two clients without share_gpus, and one client
#     of two ranks (exit 2 and the host/GPU/ranks message expected);
#   - bench/step_ratio.py: the federated client's inner step against a plain DeepSpeed + PEFT loop,
#     on a Llama of hidden 1024 x 8 layers built from config, ZeRO-2, fp32 and bf16.
# Each job prints `label rc seconds headline`; the log of every job stays in OUTDIR/<label>.log.
#
# Knobs (environment):
#   PYTHON          the Python with torch (CUDA), deepspeed, peft, mpi4py (default python3)
#   MPICH_MPIEXEC   MPICH's mpiexec (default: mpiexec next to PYTHON, e.g. the pip `mpich` wheel's)
#   OPENMPI_MPIRUN  Open MPI's mpirun (default /usr/bin/mpirun)
#   MPICH_LIBMPI / OPENMPI_LIBMPI  the library each MPI's ranks load (MPI4PY_LIBMPI, for the mpi4py
#                   wheel that supports both; default: the mpich wheel's libmpi.so.12 beside
#                   MPICH_MPIEXEC, and libmpi.so.40 from the system's library path)
#   OUTDIR          where runs and logs go (default runs/gpu-check)
#   JOBS            demo jobs run at once (default 3; they share the GPU)
#   ONLY            run only the demo jobs whose label matches this regex (default: all)
#   RATIO           0 = skip the step-time ratio (default 1)
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MPICH_MPIEXEC=${MPICH_MPIEXEC:-$(dirname "$(command -v "$PYTHON")")/mpiexec}
OPENMPI_MPIRUN=${OPENMPI_MPIRUN:-/usr/bin/mpirun}
MPICH_LIBMPI=${MPICH_LIBMPI:-$(dirname "$MPICH_MPIEXEC")/../lib/libmpi.so.12}
OPENMPI_LIBMPI=${OPENMPI_LIBMPI:-libmpi.so.40}
OUTDIR=${OUTDIR:-runs/gpu-check}
JOB_TIMEOUT=${JOB_TIMEOUT:-300}
JOBS=${JOBS:-3}
ONLY=${ONLY:-.}
RATIO=${RATIO:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
mkdir -p "$OUTDIR"
SHORT=(--set train.rounds=2 --set train.inner_steps=5 --set train.personal_steps=10 --set data.rows_per_client=60)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, deepspeed, transformers, peft, mpi4py; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| mpi4py', mpi4py.__version__)"
"$MPICH_MPIEXEC" --version 2>&1 | head -1
"$OPENMPI_MPIRUN" --version 2>&1 | head -1
"$PYTHON" -m fdlora_cluster.cli pretrain configs/demo.yaml | tail -1   # the cached base, once, before jobs run at once

job() {  # label mpiexec expected_rc [--set ...]: one demo job, one result line
    local label=$1 mpiexec=$2 want=$3; shift 3
    local t0=$SECONDS libmpi=$MPICH_LIBMPI
    [[ $mpiexec == "$OPENMPI_MPIRUN" ]] && libmpi=$OPENMPI_LIBMPI
    MPI4PY_LIBMPI=$libmpi timeout "$JOB_TIMEOUT" "$PYTHON" -m fdlora_cluster.cli launch configs/demo.yaml --mpiexec "$mpiexec" --output "$OUTDIR/$label" \
        "${SHORT[@]}" "$@" >"$OUTDIR/$label.log" 2>&1
    local rc=$? what
    if [[ $rc == 0 ]]; then
        what=$("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print(' '.join(f\"c{c['client']}:{a}={m.get('accuracy', float('nan')):.3f}\" for c in s['clients'] for a, m in c['metrics'].items()))" "$OUTDIR/$label/summary.json")
    else
        what=$(grep -m1 -E "topology error|error:" "$OUTDIR/$label.log" | cut -c1-400)
    fi
    local verdict=OK; [[ $rc == "$want" ]] || verdict=UNEXPECTED
    printf '%-34s rc=%s (want %s) %-10s %4ss  %s\n' "$label" "$rc" "$want" "$verdict" $((SECONDS - t0)) "$what"
}

running=0
spawn() {
    [[ $1 =~ $ONLY ]] || return 0
    job "$@" & running=$((running + 1));     if (( running >= JOBS )); then wait -n; running=$((running - 1)); fi
}

echo "== demo jobs (NCCL inside clients): label rc verdict seconds per-client accuracy =="
for mpi in mpich openmpi; do
    mpiexec=$MPICH_MPIEXEC; [[ $mpi == openmpi ]] && mpiexec=$OPENMPI_MPIRUN
    for zero in 2 3; do
        for prec in fp32 bf16; do
            extra=(); [[ $prec == bf16 ]] && extra=(--set deepspeed.bf16.enabled=true)
            spawn "$mpi-z$zero-$prec-1client" "$mpiexec" 0 --set 'topology.clients=[1]' \
                --set deepspeed.zero_optimization.stage=$zero "${extra[@]}"
        done
    done
    spawn "$mpi-z2-fp32-2clients-shared" "$mpiexec" 0 --set 'topology.clients=[1,1]' --set topology.share_gpus=true
done
spawn "refuse-2clients-unshared" "$MPICH_MPIEXEC" 2 --set 'topology.clients=[1,1]'
spawn "refuse-1client-2ranks-1gpu" "$MPICH_MPIEXEC" 2 --set 'topology.clients=[2]'
wait

[[ $RATIO == 1 ]] || exit 0
echo "== inner step: federated client vs plain DeepSpeed + PEFT loop (hidden 1024 x 8 layers, ZeRO-2) =="
BIG=(--set model.pretrained=null --set model.config.hidden_size=1024 --set model.config.intermediate_size=2816
     --set model.config.num_hidden_layers=8 --set model.config.num_attention_heads=16
     --set model.config.num_key_value_heads=16 --set deepspeed.zero_optimization.stage=2)
for prec in fp32 bf16; do
    extra=(); [[ $prec == bf16 ]] && extra=(--set deepspeed.bf16.enabled=true)
    MPI4PY_LIBMPI=$MPICH_LIBMPI "$PYTHON" bench/step_ratio.py configs/demo.yaml --label "$prec" --steps 50 --mpiexec "$MPICH_MPIEXEC" \
        --out "$OUTDIR/ratio-$prec" "${BIG[@]}" "${extra[@]}" 2>&1 | tail -1
done
