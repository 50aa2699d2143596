#!/usr/bin/env bash
# N CPU processes of fdistill.main on this machine, joined by jax.distributed over localhost.
#
#   launch/local_multiprocess.sh 2 --config=configs/toy2d_teacher.py --workdir=runs/mp --mode=train_teacher
#
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 2), so the run sees
# N * DEVICES_PER_PROCESS devices, exactly as N hosts of a pod would. All arguments after N
# go to every process unchanged. Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   PORT                 coordinator port on localhost (default: a free one)
#   LOG_DIR              where process_<i>.log go (default: stdout/stderr of this script)
#   PYTHON               interpreter (default: .venv/bin/python if present, else python3)
# SIGTERM / SIGINT to this script are forwarded to every process (a preemption notice: they
# agree on a step, save a checkpoint and exit 0). The exit status is the first non-zero one.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
NUM_PROCESSES=$1
shift
cd "$(dirname "$0")/.."
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

pids=()
forward() {
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < NUM_PROCESSES; i++)); do
  cmd=(env JAX_PLATFORMS=cpu
       XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
       "$PYTHON" -m fdistill.main "$@" --distributed=on
       --coordinator_address="localhost:${PORT}" --num_processes="${NUM_PROCESSES}"
       --process_id="${i}")
  if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
  echo "local_multiprocess: process ${i} pid $! (coordinator localhost:${PORT})" >&2
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early (status > 128) when a trapped signal arrives; wait again until it exits.
  while true; do
    set +e
    wait "$pid"
    rc=$?
    set -e
    if [[ $rc -gt 128 ]] && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
done
exit $status
