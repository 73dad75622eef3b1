#!/usr/bin/env bash
# OpenMPI: mpirun starts the ranks; each maps OMPI_COMM_WORLD_* onto RANK/WORLD_SIZE/LOCAL_RANK.
#
# Knobs (environment variables; default in brackets):
#   NP           number of ranks                                         [8]
#   HOSTS        mpirun -H list, e.g. node1:8,node2:8                    [this node]
#   HOSTFILE     or an OpenMPI hostfile, "host slots=N" per line         []
#   MASTER_ADDR  address of rank 0's node      [first host of HOSTS or HOSTFILE; 127.0.0.1 on this node alone]
#   MASTER_PORT  rendezvous port                                         [29500]
#   EXPORT       more variables for every rank, space separated (PATH, MASTER_*, NCCL_* always go) []
#   MPIRUN_ARGS  extra mpirun flags, e.g. "--allow-run-as-root --oversubscribe" []
#   CONFIG       preset or YAML file                                     [paper-1024x8]
#   RESUME       auto | none | PATH                                      [auto]
#   PYTHON       interpreter on every node                               [python]
#   DRY_RUN      1: print the command instead of running it              [0]
# Ranks on other nodes see only the variables forwarded with -x: PATH, MASTER_ADDR/PORT, every NCCL_*
# set here (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) and those named in EXPORT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/hostfile.sh"
NP=${NP:-8}
HOSTS=${HOSTS:-}
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-paper-1024x8}
RESUME=${RESUME:-auto}
PYTHON=${PYTHON:-python}
read -r -a extra <<< "${MPIRUN_ARGS:-}"
if [[ -n "$HOSTFILE" ]]; then
  check_hostfile "$HOSTFILE" mpirun.sh
  first=$(hostfile_hosts "$HOSTFILE" | sed -n 1p)
  extra=(--hostfile "$HOSTFILE" "${extra[@]}")
else
  first=${HOSTS%%,*}
  first=${first%%:*}
fi
MASTER_ADDR=${MASTER_ADDR:-${first:-127.0.0.1}}
forward=(-x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT" -x PATH)
for name in $(compgen -e | grep '^NCCL_' || true) ${EXPORT:-}; do forward+=(-x "$name"); done

cmd=(mpirun -np "$NP" ${HOSTS:+-H "$HOSTS"} "${extra[@]}" "${forward[@]}"
     "$PYTHON" -m topk_ds.train --config "$CONFIG" --resume "$RESUME" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else exec "${cmd[@]}"; fi
