#!/bin/bash
# De-identify a BIDS dataset (or any folder of scans) on a SLURM cluster: one array task per shard, all
# writing into the same output folder at the same time. Submit with a contiguous array, e.g. 10 shards:
#
#   sbatch --array=0-9 examples/slurm_array.sh /data/bids /data/derivatives/mrideidentify [batch options]
#
# A task that fails or times out can simply be resubmitted (sbatch --array=3 ...): finished scans are skipped.
#SBATCH --job-name=mri-deidentify
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --output=mri-deidentify-%A_%a.log
set -euo pipefail

input=${1:?usage: sbatch --array=0-N slurm_array.sh INPUT OUTPUT [batch options]}
output=${2:?usage: sbatch --array=0-N slurm_array.sh INPUT OUTPUT [batch options]}
shift 2
# The array index, counted from the array's first index, is the shard; the number of tasks is the shard count.
shards=${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=FIRST-LAST}
index=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
# Every worker of the task fits in the cores and memory SLURM gave it (--jobs auto reads both).
# MRI_DEIDENTIFY: the command to run, e.g. a container: "apptainer exec mrideidentify.sif mri-deidentify".
exec ${MRI_DEIDENTIFY:-mri-deidentify} batch "$input" "$output" --shard "$index/$shards" --jobs auto "$@"
