#!/bin/bash
# SLURM: one participant per array task, then the group level once the array is done.
#
#   sbatch --array=1-$(($(wc -l < $BIDS/participants.tsv) - 1))%50 scripts/slurm_ms3seg.sh participant
#   sbatch --dependency=afterany:<array job id> scripts/slurm_ms3seg.sh group
#
# Set BIDS, OUT and SIF (the Singularity/Apptainer image) below or in the environment.
#SBATCH --job-name=ms3seg
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=00:30:00
#SBATCH --output=ms3seg_%A_%a.log
set -euo pipefail
BIDS=${BIDS:?set BIDS to the BIDS dataset}
OUT=${OUT:?set OUT to the output folder}
SIF=${SIF:-ms3seg.sif}
WORK=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/ms3seg_work_${SLURM_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}
LEVEL=${1:-participant}
run() { singularity run --cleanenv --containall -B "$BIDS:/data:ro" -B "$OUT:/out" -B "$WORK:/work" \
          ${GPU:+--nv} "$SIF" "$@"; }
mkdir -p "$OUT" "$WORK"
if [ "$LEVEL" = participant ]; then
  # line N+1 of participants.tsv is task N (line 1 is the header)
  LABEL=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$BIDS/participants.tsv" | cut -f1)
  run /data /out participant --participant-label "${LABEL#sub-}" -w /work \
      --omp-nthreads "${SLURM_CPUS_PER_TASK:-2}" --skip-bids-validation
else
  run /data /out group
fi
rm -rf "$WORK"
