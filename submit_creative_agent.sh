#!/bin/bash
# Train the creative agent on SLURM nodes of 4 x A100, across 48-hour limits: submit once with
#   sbatch submit_creative_agent.sh                     (one node; sbatch --nodes 2 submit_creative_agent.sh for two)
# Ten minutes before the time limit (or on preemption) SLURM sends SIGUSR1: training finishes its step, writes
# checkpoint_last.pt and requeues this job itself (scontrol requeue); the requeued job has the same fixed run name
# and continues with --resume auto, until the last epoch is done. A run that finished never requeues.
# Pre-encode the latents once with a short job, then train after it (see README):
#   jid=$(sbatch --parsable --time 1:00:00 --export ALL,PREPARE=1 submit_creative_agent.sh)
#   sbatch --dependency=afterok:$jid submit_creative_agent.sh
#
#SBATCH --job-name=creative_agent
#SBATCH --nodes=1                        # more nodes: sbatch --nodes N (every node runs 4 tasks)
#SBATCH --ntasks-per-node=4              # one task per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8                # each task: the training loop + 7 data-loader workers
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append               # a requeued job appends to the same log
#SBATCH --output=logs/creative_agent_%j.out
# --- change these two for your cluster (or pass them to sbatch: sbatch -A ACCOUNT -p PARTITION ...) ---
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_GPU_PARTITION

# --- settings you may change ---
ENV_ACTIVATE="${ENV_ACTIVATE:-}"               # e.g. "source ~/venvs/creative/bin/activate" or "conda activate creative"
DATASET="${DATASET:-dataset_wav_pairs}"       # pairs folder (python make_pairs.py --from_folder MUSIC --out DATASET)
RUN_NAME="${RUN_NAME:-creative_agent}"        # fixed, so a requeued or resubmitted job resumes this run
EPOCHS="${EPOCHS:-200}"
EXTRA_ARGS="${EXTRA_ARGS:-}"                  # any other train_simple_ddp.py flags (e.g. --codec encodec --codec_path DIR)
PYTHON="${PYTHON:-python}"                    # the Python that has the project's packages
PREPARE="${PREPARE:-0}"                       # 1: only check the files and fill the latent cache, then exit

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
mkdir -p logs
if [ -n "$ENV_ACTIVATE" ]; then eval "$ENV_ACTIVATE"; fi

# every task joins the job through SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; rank 0's host is the master.
# The port is train_simple_ddp.py's, from the job id (set MASTER_PORT here to choose another).
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || true)"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), master ${MASTER_ADDR}"

MODE_ARGS=(--resume auto)
if [ "$PREPARE" = "1" ]; then MODE_ARGS=(--prepare_only); fi

# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" train_simple_ddp.py \
    --dataset_folder "$DATASET" --cache_latents \
    --run_name "$RUN_NAME" "${MODE_ARGS[@]}" \
    --num_epochs "$EPOCHS" --batch_size 8 --lr 1e-4 \
    --use_creative_agent true --mask_reg_weight 0.1 \
    --shuffle_targets false --anti_cheating 0.1 \
    $EXTRA_ARGS
