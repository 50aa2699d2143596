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
# agree on a step, save a checkpoint and exit 0). The exit status is the first non-zero one;
# a process that fails makes this script kill the others (srun --kill-on-bad-exit; not with
# KILL_ON_BAD_EXIT=0). Each non-zero exit is reported as "pid P exited RC".
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  sed -n '2,16p' "$0" >&2
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

# Like srun --kill-on-bad-exit: the first process to fail stops the others (a hung peer would
# otherwise keep this script waiting forever). Needs bash >= 5.1 (wait -n -p).
status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  set +e
  finished=
  wait -n -p finished "${running[@]}"
  rc=$?
  set -e
  # A trapped signal interrupts `wait` (status > 128, no pid): wait again.
  if [[ -z "$finished" ]]; then continue; fi
  still=()
  for pid in "${running[@]}"; do [[ $pid != "$finished" ]] && still+=("$pid"); done
  running=("${still[@]}")
  if [[ $rc -ne 0 ]]; then echo "local_multiprocess: pid ${finished} exited ${rc}" >&2; fi
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    if [[ ${KILL_ON_BAD_EXIT:-1} == 1 ]]; then forward KILL; fi
  fi
done
exit $status
