#!/bin/bash
# SLURM: one participant per array task, then the group level once the array is done.
#
#   sbatch --array=1-$(scripts/slurm_ms3seg.sh count)%50 scripts/slurm_ms3seg.sh participant
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
LEVEL=${1:-participant}
# participant N is the N-th non-empty line after the header (a last line without its newline
# counts; Windows line ends are dropped); "count" prints how many there are
participant() { awk -v n="$1" 'NR > 1 { sub(/\r$/, "") } NR > 1 && NF { i++; if (n == "" || i == n) print $1 }' "$BIDS/participants.tsv"; }
if [ "$LEVEL" = count ]; then participant "" | awk 'END { print NR }'; exit 0; fi
OUT=${OUT:?set OUT to the output folder}
SIF=${SIF:-ms3seg.sif}
WORK=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/ms3seg_work_${SLURM_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}
run() { singularity run --cleanenv --containall -B "$BIDS:/data:ro" -B "$OUT:/out" -B "$WORK:/work" \
          ${GPU:+--nv} "$SIF" "$@"; }
mkdir -p "$OUT" "$WORK"
trap 'rm -rf "$WORK"' EXIT  # also when ms3seg fails (set -e stops the script)
# on SIGTERM (time limit, scancel) wait for ms3seg's own clean-up, then exit: without this trap
# bash would exit at once and remove the work folder while ms3seg still uses it
trap 'exit 143' TERM
if [ "$LEVEL" = participant ]; then
  LABEL=$(participant "${SLURM_ARRAY_TASK_ID:?run as an array task: sbatch --array=1-N}")
  [ -n "$LABEL" ] || { echo "no participant $SLURM_ARRAY_TASK_ID in $BIDS/participants.tsv" >&2; exit 2; }
  run /data /out participant --participant-label "${LABEL#sub-}" -w /work \
      --omp-nthreads "${SLURM_CPUS_PER_TASK:-2}" --skip-bids-validation
else
  run /data /out group
fi
