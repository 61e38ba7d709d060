#!/usr/bin/env bash
# Usage: launch/local.sh NUM_PROCESSES [alexnet_jax.main flags...]
#
# Runs NUM_PROCESSES copies of `python -m alexnet_jax.main` on this machine,
# joined by jax.distributed over loopback, e.g. 2 processes with 2 simulated
# CPU devices each (4 in all):
#
#   bash launch/local.sh 2 --config=configs/one_weird_trick.py:synthetic \
#       --workdir=/tmp/owt_mp --config.num_devices=4
#
# --config.num_devices is the GLOBAL device count; every process simulates
# num_devices / NUM_PROCESSES CPU devices (alexnet_jax.runtime.setup), so it
# must divide evenly. Output lines are prefixed with the process index. If one
# process fails the others are stopped and the script exits with its status.
#
# Environment:
#   PORT           coordinator port on 127.0.0.1 (default: a free port)
#   PYTHON         interpreter (default: python, else python3)
#   JAX_PLATFORMS  default cpu: several processes on one machine are a test
#                  of the multi-host path, not a way to share GPUs.
#   STOP_GRACE_SECONDS  when one process fails, or on Ctrl-C or SIGTERM,
#                  the processes still running get SIGTERM (the trainer
#                  saves a checkpoint if it can) and SIGKILL this many
#                  seconds later (default 60).
# Run from the repository root: the configs are imported as `configs.*`.

set -euo pipefail

usage() {
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

if (( $# < 1 )) || [[ "$1" == -h || "$1" == --help ]]; then
  usage
fi
if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NUM_PROCESSES must be a positive integer, got '$1'" >&2
  usage
fi
num_processes=$1
shift

python_bin=${PYTHON:-}
if [[ -z "$python_bin" ]]; then
  python_bin=$(command -v python || command -v python3 || true)
fi
if [[ -z "$python_bin" ]]; then
  echo 'error: no python found; set PYTHON=/path/to/python' >&2
  exit 2
fi

# A device count that does not divide would be rounded down per process and
# fail later with a less obvious message; say it here.
for ((a = 1; a <= $#; a++)); do
  arg=${!a}
  value=
  if [[ "$arg" == --config.num_devices=* ]]; then
    value=${arg#*=}
  elif [[ "$arg" == --config.num_devices ]] && (( a < $# )); then
    next=$((a + 1))
    value=${!next}
  fi
  if [[ "$value" =~ ^[0-9]+$ ]] && (( 10#$value % num_processes )); then
    echo "error: --config.num_devices=$value does not split over" \
      "$num_processes processes" >&2
    exit 2
  fi
done

port=${PORT:-$("$python_bin" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

grace=${STOP_GRACE_SECONDS:-60}
declare -A index_of=()  # pid -> process index, for the processes still running
stop_at=
killed=0

stop_all() {
  # SIGTERM makes the trainer save a checkpoint and exit after its step
  # (train._Preemption). One waiting in a collective for a dead peer exits by
  # itself once the peer misses its heartbeats (--heartbeat_timeout_seconds);
  # whatever is still running after the grace period is killed.
  [[ -n "$stop_at" ]] && return
  stop_at=$((SECONDS + grace))
  for pid in "${!index_of[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
status=0
trap 'status=130; stop_all' INT
trap 'status=143; stop_all' TERM

for ((i = 0; i < num_processes; i++)); do
  # `exec` makes $! the trainer's own pid, so it can be signalled directly.
  # sed -u passes each prefixed line on as soon as it is written.
  (exec "$python_bin" -m alexnet_jax.main \
      --coordinator_address="127.0.0.1:$port" \
      --num_processes="$num_processes" --process_id="$i" "$@") \
      > >(sed -u "s/^/[$i] /") 2>&1 &
  index_of[$!]=$i
done

while (( ${#index_of[@]} )); do
  for pid in "${!index_of[@]}"; do
    # The shell reaps its children as they exit, so kill -0 fails once the
    # process is gone and `wait` then returns its saved status.
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    i=${index_of[$pid]}
    unset "index_of[$pid]"
    if (( rc != 0 && status == 0 )); then
      echo "local.sh: process $i exited with status $rc; stopping the others" >&2
      status=$rc
      stop_all
    fi
  done
  if [[ -n "$stop_at" ]] && (( !killed && SECONDS >= stop_at )); then
    for pid in "${!index_of[@]}"; do
      echo "local.sh: process ${index_of[$pid]} still running ${grace}s after" \
        "SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    done
    killed=1
  fi
  # A Ctrl-C also reaches sleep; under set -e that would end the script
  # before the stragglers get SIGKILL.
  sleep 0.5 || true
done
# Let the output filters drain before returning.
wait
exit "$status"
