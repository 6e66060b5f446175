#!/usr/bin/env bash
# Submit `exitnas search RUN_DIR --backend ray` to the cluster of launch/ray-cluster.yaml.
#
#   EXITNAS_STORAGE=postgresql://exitnas:PASSWORD@10.0.0.10/exitnas \
#     launch/submit_search.sh /shared/runs/cifar --trials 2000 --budget 0.6
#
# The driver runs on the head node (where the run directory and the data must be readable:
# the supernet's cache actor is pinned to the driver's node). Rerunning the same command
# resumes the search (Tuner.restore) and stops at exactly --trials complete trials. The driver
# runs with RAY_AUTH_MODE=token and the head's ~/.ray/auth_token (see ray-cluster.yaml); so
# does `ray job submit` here, with your ~/.ray/auth_token (the one ray-cluster.yaml copies).
#
# Environment:
#   CLUSTER          cluster config (default: launch/ray-cluster.yaml)
#   EXITNAS_STORAGE  the study's storage URL; default: RUN_DIR/search/study.log on /shared
#   MODE             exec (default): `ray exec --tmux` on the head, survives your logout;
#                    job: `ray job submit` through the dashboard's SSH tunnel (run
#                    `ray dashboard "$CLUSTER"` in another terminal first)
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit 2; fi

CLUSTER="${CLUSTER:-$(dirname "$0")/ray-cluster.yaml}"
MODE="${MODE:-exec}"
RUN_DIR="$1"; shift
EXITNAS="~/exitnas-venv/bin/exitnas"

args=(search "$RUN_DIR" --backend ray --address auto "$@")
quoted=$(printf ' %q' "${args[@]}")
envs="RAY_AUTH_MODE=token "
if [[ -n "${EXITNAS_STORAGE:-}" ]]; then
  envs+="EXITNAS_STORAGE=$(printf '%q' "$EXITNAS_STORAGE") "
fi

case "$MODE" in
  exec)
    # tmux keeps the driver alive after you disconnect; `ray attach "$CLUSTER" --tmux` to watch
    exec ray exec "$CLUSTER" --tmux "${envs}${EXITNAS}${quoted}"
    ;;
  job)
    export RAY_AUTH_MODE=token  # the dashboard asks for the token too
    exec ray job submit --address http://127.0.0.1:8265 -- bash -lc "${envs}${EXITNAS}${quoted}"
    ;;
  *)
    echo "submit_search.sh: MODE must be exec or job, not $MODE" >&2; exit 2
    ;;
esac
