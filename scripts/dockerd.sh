#!/usr/bin/env bash
# A Docker engine of the project's own, for the Testcontainers and compose tests (issue 12).
#
#   scripts/dockerd.sh start   start dockerd unless one answers already; prints DOCKER_HOST=... on stdout
#   scripts/dockerd.sh stop [PID]  stop the dockerd that `start` started (and nothing else; with PID, only if
#                              it is still that one: a run that ended late never stops the next run's engine)
#   scripts/dockerd.sh env     print DOCKER_HOST=... of the running one
#
# Installs Debian's docker.io and docker-compose with apt-get when missing (root only). Its data (images,
# the build cache) lives in $IMAGEFORK_CACHE/docker (default ~/.cache/imagefork/docker), its socket there
# too, so it never takes over /var/run/docker.sock. Published ports bind to 127.0.0.1 only (--ip). Exit
# code 3 with one line on stderr when docker cannot run here (not root, no apt-get, dockerd fails).
set -euo pipefail
CACHE="${IMAGEFORK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagefork}"
DIR="$CACHE/docker"
SOCK="$DIR/docker.sock"
PIDFILE="$DIR/dockerd.pid"
LOG="$DIR/dockerd.log"
say() { echo "dockerd.sh: $*" >&2; }
cannot() { say "$*"; exit 3; }

answers() { DOCKER_HOST="unix://$SOCK" timeout 10 docker info >/dev/null 2>&1; }

install() {
  command -v dockerd >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1 && return 0
  [ "$(id -u)" = 0 ] || cannot "dockerd is not installed and this is not root (apt-get install docker.io docker-compose)"
  command -v apt-get >/dev/null 2>&1 || cannot "dockerd is not installed and there is no apt-get"
  say "installing Debian's docker.io, docker-compose and debootstrap with apt-get"
  local start=$SECONDS
  { export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --no-install-recommends docker.io docker-compose debootstrap; } \
    >"$DIR/apt.log" 2>&1 || { tail -20 "$DIR/apt.log" >&2; cannot "apt-get install docker.io failed (log: $DIR/apt.log)"; }
  say "installed in $((SECONDS - start))s: $(dockerd --version)"
}

start() {
  mkdir -p "$DIR"
  if answers; then echo "DOCKER_HOST=unix://$SOCK"; return 0; fi
  [ "$(id -u)" = 0 ] || cannot "dockerd needs root here (this is uid $(id -u))"
  install
  say "starting dockerd (data in $DIR/data, socket $SOCK, log $LOG)"
  # a dockerd of ours that died leaves its pid file: dockerd refuses to start over a live one only
  setsid dockerd --data-root "$DIR/data" --exec-root "$DIR/run" --pidfile "$PIDFILE" -H "unix://$SOCK" \
    --storage-driver overlay2 --ip 127.0.0.1 --userland-proxy=true \
    >"$LOG" 2>&1 </dev/null &
  local pid=$!
  for _ in $(seq 1 120); do
    if answers; then echo "DOCKER_HOST=unix://$SOCK"; return 0; fi
    kill -0 "$pid" 2>/dev/null || { tail -5 "$LOG" >&2; cannot "dockerd exited at start (log: $LOG)"; }
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  tail -5 "$LOG" >&2
  cannot "dockerd did not answer within 60s (log: $LOG)"
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid; pid=$(cat "$PIDFILE")
  # `stop PID`: only the engine this caller started (another run may have started the one there now)
  if [ -n "${1:-}" ] && [ "$1" != "$pid" ]; then say "dockerd $1 is gone already; $pid is another run's: left alone"; return 0; fi
  # only ours: its command line names our pid file
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$PIDFILE"; then rm -f "$PIDFILE"; return 0; fi
  # containers first (ours: this engine runs nothing else), then the engine and its containerd
  local ids; ids=$(DOCKER_HOST="unix://$SOCK" timeout 30 docker ps -aq 2>/dev/null || true)
  [ -z "$ids" ] || DOCKER_HOST="unix://$SOCK" timeout 60 docker rm -f $ids >/dev/null 2>&1 || true
  DOCKER_HOST="unix://$SOCK" timeout 60 docker network prune -f >/dev/null 2>&1 || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  # what it leaves mounted (the netns of its default network) under its exec root
  awk -v d="$DIR/run/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount "$m" || true; done
  # its default bridge outlives it: remove the interface (it comes back with the next start)
  if command -v ip >/dev/null 2>&1 && ip link show docker0 >/dev/null 2>&1; then ip link delete docker0 || true; fi
  say "dockerd stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  env) answers && echo "DOCKER_HOST=unix://$SOCK" ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
