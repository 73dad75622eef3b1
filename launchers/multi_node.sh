#!/usr/bin/env bash
# Several nodes from one login/head node: the deepspeed launcher starts the ranks over pdsh (or ssh).
#
# Knobs (environment variables; default in brackets):
#   HOSTFILE     hostfile, "host slots=N" per line          [hostfile beside this file]
#   LAUNCHER     pdsh | openmpi | mvapich | slurm           [pdsh]
#   MASTER_ADDR  address of the first node                  [first host in HOSTFILE]
#   MASTER_PORT  rendezvous port                            [29500]
#   CONFIG       preset or YAML file                        [paper-2048x24]
#   RESUME       auto | none | PATH                         [auto]
#   DRY_RUN      1: print the command instead of running it  [0]
# Variables listed in ~/.deepspeed_env (NAME=value lines) are exported on every node, e.g.
# NCCL_SOCKET_IFNAME, NCCL_IB_HCA, WANDB_MODE. Checkpoints must be on a filesystem all nodes share.
set -euo pipefail
HOSTFILE=${HOSTFILE:-$(dirname "$0")/hostfile}
LAUNCHER=${LAUNCHER:-pdsh}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-paper-2048x24}
RESUME=${RESUME:-auto}
[[ -f "$HOSTFILE" ]] || { echo "multi_node.sh: no hostfile at $HOSTFILE (see launchers/hostfile.example)" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}

cmd=(deepspeed --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --module topk_ds.train --config "$CONFIG" --resume "$RESUME" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else exec "${cmd[@]}"; fi
