#!/bin/bash
# Train the creative agent on one node of 4 x A100 for up to 48 h: sbatch submit_creative_agent.sh
# Resubmit the same script to continue: the run has a fixed name and resumes from its checkpoint_last.pt.
# SLURM sends SIGUSR1 ten minutes before the time limit; training then saves checkpoint_last.pt and exits cleanly.
#
#SBATCH --job-name=creative_agent
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4              # one task per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8                # data loader workers of each task
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --output=logs/creative_agent_%j.out
# --- change these two for your cluster (or pass them to sbatch: sbatch -A ACCOUNT -p PARTITION ...) ---
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_GPU_PARTITION

# --- settings you may change ---
ENV_ACTIVATE="${ENV_ACTIVATE:-}"               # e.g. "source ~/venvs/creative/bin/activate" or "conda activate creative"
DATASET="${DATASET:-dataset_wav_pairs}"       # pairs folder (python make_pairs.py --from_folder MUSIC --out DATASET)
RUN_NAME="${RUN_NAME:-creative_agent}"        # fixed, so a resubmitted job resumes this run
EPOCHS="${EPOCHS:-200}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # any other train_simple_ddp.py flags
PYTHON="${PYTHON:-python}"                    # the Python that has the project's packages

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
mkdir -p logs
if [ -n "$ENV_ACTIVATE" ]; then eval "$ENV_ACTIVATE"; fi

# every task joins the job through SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; rank 0's host is the master
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || true)"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" train_simple_ddp.py \
    --dataset_folder "$DATASET" \
    --run_name "$RUN_NAME" --resume auto \
    --num_epochs "$EPOCHS" --batch_size 8 --lr 1e-4 \
    --use_creative_agent true --mask_reg_weight 0.1 \
    --shuffle_targets false --anti_cheating 0.1 \
    $EXTRA_ARGS
