#!/usr/bin/env bash
# One node, NUM_GPUS GPUs (or CPU ranks), through the deepspeed launcher.
#
# Knobs (environment variables; default in brackets):
#   CONFIG       preset or YAML file                        [paper-1024x8]
#   NUM_GPUS     ranks on this node                          [8]
#   MASTER_PORT  rendezvous port                             [29500]
#   RESUME       auto | none | PATH (see topk-ds train -h)   [auto]
#   DRY_RUN      1: print the command instead of running it  [0]
# Further arguments go to the trainer, e.g.
#   launchers/single_node.sh --set data.path=/data/fineweb-edu --set train.out_dir=runs/topk-1024x8
# Preemption: SIGUSR1 to this launcher's process group makes every rank finish its step, save and exit 0
# (the deepspeed launcher runs with SIGUSR1 ignored). SIGTERM reaches the launcher too, and it SIGKILLs the
# ranks 30 s later, whether or not their checkpoint is written.
set -euo pipefail
CONFIG=${CONFIG:-paper-1024x8}
NUM_GPUS=${NUM_GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RESUME=${RESUME:-auto}

cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT"
     --module topk_ds.train --config "$CONFIG" --resume "$RESUME" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else trap '' USR1; exec "${cmd[@]}"; fi
