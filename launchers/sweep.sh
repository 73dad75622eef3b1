#!/usr/bin/env bash
# The paper's ablation grids, one run directory per point, one after another through LAUNCH.
#
# Knobs (environment variables; default in brackets):
#   GRID       k | nontopk | dim                                     [k]
#   BASE       base preset or YAML (the paper's ablations: 1024 x 8) [paper-1024x8]
#   OUT_ROOT   parent of the run directories                         [runs/sweep]
#   LAUNCH     launcher script that takes the config through CONFIG  [single_node.sh beside this file]
#   VALUES     override the grid's values, space separated           [the paper's]
#   DRY_RUN    1: print the commands instead of running them         [0]
# Grids (Appendix A): k in 8 16 32 64 128 256 512; n_nontopk in 0 1 2; D in 1024 2048 3072 4096 8192
# (ffn_dim stays fixed when D widens; D >= 4096 turns on activation checkpointing).
# Further arguments go to every run, e.g. --set data.path=/data/fineweb-edu
set -euo pipefail
GRID=${GRID:-k}
BASE=${BASE:-paper-1024x8}
OUT_ROOT=${OUT_ROOT:-runs/sweep}
LAUNCH=${LAUNCH:-$(dirname "$0")/single_node.sh}

case "$GRID" in
  k)       VALUES=${VALUES:-"8 16 32 64 128 256 512"}; field=topk.k ;;
  nontopk) VALUES=${VALUES:-"0 1 2"}; field=topk.n_nontopk ;;
  dim)     VALUES=${VALUES:-"1024 2048 3072 4096 8192"}; field=model.dim ;;
  *) echo "sweep.sh: GRID must be k, nontopk or dim, got '$GRID'" >&2; exit 2 ;;
esac

for value in $VALUES; do
  extra=(--set "$field=$value" --set "train.out_dir=$OUT_ROOT/$GRID-$value")
  if [[ "$GRID" == dim && "$value" -ge 4096 ]]; then extra+=(--set train.activation_checkpointing=true); fi
  CONFIG="$BASE" DRY_RUN="${DRY_RUN:-0}" bash "$LAUNCH" "${extra[@]}" "$@"
done
