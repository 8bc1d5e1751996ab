#!/bin/bash
# De-identify a dataset with N shard processes at the same time, without a scheduler (xargs), each with its
# share of this machine's cores, all writing into the same output folder:
#
#   examples/parallel_shards.sh /data/bids /data/derivatives/mrideidentify 4 [batch options]
#
# The same with GNU parallel, also across machines that see the same folders (--sshloginfile):
#   parallel -j 4 mri-deidentify batch /data/bids /data/derivatives/mrideidentify --shard {}/4 ::: 0 1 2 3
# On one machine, `mri-deidentify batch INPUT OUTPUT --jobs N` does the same in one command.
set -euo pipefail

input=${1:?usage: parallel_shards.sh INPUT OUTPUT SHARDS [batch options]}
output=${2:?usage: parallel_shards.sh INPUT OUTPUT SHARDS [batch options]}
shards=${3:?usage: parallel_shards.sh INPUT OUTPUT SHARDS [batch options]}
shift 3
cores=$(nproc)
threads=$((cores / shards > 0 ? cores / shards : 1))
# xargs exits 123 when any shard failed (a scan that could not be de-identified); rerunning finishes the rest.
seq 0 $((shards - 1)) | OMP_NUM_THREADS=$threads xargs -P "$shards" -I{} \
    ${MRI_DEIDENTIFY:-mri-deidentify} batch "$input" "$output" --shard "{}/$shards" "$@"
