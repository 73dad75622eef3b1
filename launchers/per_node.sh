#!/usr/bin/env bash
# One node of a multi-node run, started on every node by a scheduler (one task per node: slurm.sbatch
# MODE=per-node, Kubernetes, LSF, or by hand), without ssh: the deepspeed launcher starts this node's ranks.
#
# Knobs (environment variables; default in brackets):
#   HOSTFILE     hostfile, "host slots=N" per line, the same on every node   [hostfile beside this file]
#   NODE_RANK    this node's line in HOSTFILE, counted from 0                 (required)
#   MASTER_ADDR  address of node 0                                           [first host in HOSTFILE]
#   MASTER_PORT  rendezvous port                                             [29500]
#   CONFIG       preset or YAML file                                         [paper-2048x24]
#   RESUME       auto | none | PATH                                          [auto]
#   DRY_RUN      1: print the command instead of running it                  [0]
# Preemption: SIGUSR1 to this node's process group makes every rank finish its step, save and exit 0. The
# deepspeed launcher runs with SIGUSR1 ignored; SIGTERM instead reaches it too, and it SIGKILLs the ranks
# 30 s later, whether or not their checkpoint is written. train.out_dir must be on a filesystem all nodes share.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/hostfile.sh"
HOSTFILE=${HOSTFILE:-$here/hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-paper-2048x24}
RESUME=${RESUME:-auto}
check_hostfile "$HOSTFILE" per_node.sh
mapfile -t hosts < <(hostfile_hosts "$HOSTFILE")
if ! [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] || (( NODE_RANK >= ${#hosts[@]} )); then
  echo "per_node.sh: NODE_RANK='${NODE_RANK:-}' must be 0 ... $(( ${#hosts[@]} - 1 )): the line of this node in $HOSTFILE" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}

cmd=(deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
     --master_port "$MASTER_PORT" --module topk_ds.train --config "$CONFIG" --resume "$RESUME" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else trap '' USR1; exec "${cmd[@]}"; fi
