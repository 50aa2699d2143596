#!/usr/bin/env bash
# fdistill on a Cloud TPU pod slice: one identical process per TPU VM host (worker).
#
#   ZONE=us-east5-a launch/tpu_pod.sh create my-pod v5p-128            # TPU VMs (runtime: RUNTIME)
#   ZONE=us-east5-a launch/tpu_pod.sh setup  my-pod                    # copy this tree, pip install
#   ZONE=us-east5-a launch/tpu_pod.sh run    my-pod --config=configs/cifar10_teacher.py \
#       --workdir=gs://my-bucket/runs/t1 --mode=train_teacher --config.train.batch_size=2048
#   ZONE=us-east5-a launch/tpu_pod.sh ssh    my-pod 'tail -n 20 ~/fdistill/run.log'
#   ZONE=us-east5-a launch/tpu_pod.sh delete my-pod
#
# `run` executes `python -m fdistill.main <args> --distributed=on` on every worker at once
# (gcloud ... ssh --worker=all); jax.distributed finds the coordinator and the process index
# from the TPU metadata, so the command is the same on every host. Arguments are quoted for the
# remote shell, so config overrides with spaces or brackets pass through unchanged. The
# workdir must be reachable from every host (a gs:// bucket). Output: ~/fdistill/run.log on
# each worker (DETACH=0 streams it here instead, but the run then dies with the ssh session).
#
# Environment: ZONE (required), PROJECT (optional gcloud project), RUNTIME (TPU software
# version for create; default v2-alpha-tpuv5), REMOTE_DIR (default fdistill, under $HOME),
# RUN_ENV (extra "KEY=VALUE ..." for every process, e.g. "XLA_FLAGS=... LIBTPU_INIT_ARGS=..."),
# DETACH (default 1).
# Preemption / maintenance events reach JAX's preemption service on every host; the run saves
# a checkpoint at an agreed step and exits 0; `run` again with the same arguments resumes.
set -euo pipefail

usage() { sed -n '2,24p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
ACTION=$1
NAME=$2
shift 2
: "${ZONE:?set ZONE (the TPU zone)}"
REMOTE_DIR=${REMOTE_DIR:-fdistill}
GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && FLAGS+=(--project="$PROJECT")

on_all_workers() {
  "${GCLOUD[@]}" ssh "$NAME" "${FLAGS[@]}" --worker=all --command="$1"
}

case "$ACTION" in
  create)
    [[ $# -ge 1 ]] || usage
    "${GCLOUD[@]}" create "$NAME" "${FLAGS[@]}" --accelerator-type="$1" \
        --version="${RUNTIME:-v2-alpha-tpuv5}"
    ;;
  setup)
    cd "$(dirname "$0")/.."
    archive=$(mktemp -t fdistill.XXXXXX.tar.gz)
    git ls-files -z | tar --null -czf "$archive" -T -
    "${GCLOUD[@]}" scp "$archive" "$NAME:fdistill.tar.gz" "${FLAGS[@]}" --worker=all
    rm -f "$archive"
    on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/fdistill.tar.gz -C ~/$REMOTE_DIR && \
      cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  run)
    args=$(printf '%q ' "$@")
    cmd="cd ~/$REMOTE_DIR && env ${RUN_ENV:-} .venv/bin/python -m fdistill.main $args --distributed=on"
    if [[ "${DETACH:-1}" == "1" ]]; then
      on_all_workers "$cmd > ~/$REMOTE_DIR/run.log 2>&1 < /dev/null & disown; echo started on \$(hostname)"
    else
      on_all_workers "$cmd"
    fi
    ;;
  ssh)
    on_all_workers "${1:?a command to run on every worker}"
    ;;
  stop)
    on_all_workers "pkill -TERM -f 'fdistill.main' || true"  # a preemption notice: save and exit
    ;;
  delete)
    "${GCLOUD[@]}" delete "$NAME" "${FLAGS[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
