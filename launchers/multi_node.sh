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
# NCCL_SOCKET_IFNAME, NCCL_IB_HCA, WANDB_MODE. train.out_dir must be on a filesystem all nodes share.
# Preemption: SIGTERM to this launcher reaches every node's ranks, which save and exit, but the deepspeed
# launcher SIGKILLs them 30 s later: where a save takes longer, use per_node.sh (SIGUSR1) or slurm.sbatch.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/hostfile.sh"
HOSTFILE=${HOSTFILE:-$here/hostfile}
LAUNCHER=${LAUNCHER:-pdsh}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-paper-2048x24}
RESUME=${RESUME:-auto}
check_hostfile "$HOSTFILE" multi_node.sh
MASTER_ADDR=${MASTER_ADDR:-$(hostfile_hosts "$HOSTFILE" | sed -n 1p)}

cmd=(deepspeed --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --module topk_ds.train --config "$CONFIG" --resume "$RESUME" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else exec "${cmd[@]}"; fi
