#!/usr/bin/env bash
# OpenMPI: mpirun starts the ranks; each maps OMPI_COMM_WORLD_* onto RANK/WORLD_SIZE/LOCAL_RANK.
#
# Knobs (environment variables; default in brackets):
#   NP           number of ranks                                   [8]
#   HOSTS        mpirun -H list, e.g. node1:8,node2:8 (empty: this node) []
#   MASTER_ADDR  address of rank 0's node                          [127.0.0.1]
#   MASTER_PORT  rendezvous port                                   [29500]
#   MPIRUN_ARGS  extra mpirun flags, e.g. "--allow-run-as-root --oversubscribe" []
#   CONFIG       preset or YAML file                               [paper-1024x8]
#   RESUME       auto | none | PATH                                [auto]
#   PYTHON       interpreter on every node                         [python]
#   DRY_RUN      1: print the command instead of running it        [0]
set -euo pipefail
NP=${NP:-8}
HOSTS=${HOSTS:-}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-paper-1024x8}
RESUME=${RESUME:-auto}
PYTHON=${PYTHON:-python}
read -r -a extra <<< "${MPIRUN_ARGS:-}"

cmd=(mpirun -np "$NP" ${HOSTS:+-H "$HOSTS"} "${extra[@]}" -x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT"
     -x PATH "$PYTHON" -m topk_ds.train --config "$CONFIG" --resume "$RESUME" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${cmd[*]}"; else exec "${cmd[@]}"; fi
