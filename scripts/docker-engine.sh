#!/usr/bin/env bash
# A Docker engine for `make test-docker` (docs/deploy.md, "Docker tests"):
#
#   bash scripts/docker-engine.sh start   # 0: an engine answers; 3: none, and why (a skip)
#   bash scripts/docker-engine.sh stop    # stops the dockerd that `start` started, only that one
#
# start: nothing to do where `docker info` already answers. Else, as root: installs what is
# missing of docker.io, debootstrap (local base images where no registry is reachable) and
# docker-compose from the distribution's apt, then starts `dockerd --bridge=none
# --iptables=false`: no bridge, no firewall rules; every container runs with --network host
# (deploy/compose.yaml does). Its log: $DOCKERD_LOG (default /tmp/radiodiff-dockerd.log).
# Not root and no engine: nothing can be installed or started, so the tests are skipped.
set -euo pipefail
PIDFILE=${DOCKERD_PIDFILE:-/tmp/radiodiff-dockerd.pid}
LOG=${DOCKERD_LOG:-/tmp/radiodiff-dockerd.log}
skip() { printf 'docker tests skipped: %s\n' "$*"; exit 3; }

answers() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

start() {
  local missing=()
  command -v dockerd >/dev/null || answers || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
    || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing ${missing[*]} (apt)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    elif ! answers; then
      skip "no Docker engine answers, and as $(id -un) without apt-get as root none can be" \
           "installed or started (missing: ${missing[*]})"
    else
      echo "missing ${missing[*]}: the tests that need them are skipped (not root: not installed)"
    fi
  fi
  if answers; then
    echo "docker engine: running ($(docker version --format '{{.Server.Version}}'))"
    return
  fi
  [ "$(id -u)" = 0 ] || skip "no Docker engine answers and $(id -un) cannot start dockerd (not root)"
  echo "starting dockerd --bridge=none --iptables=false (log: $LOG)"
  setsid dockerd --bridge=none --iptables=false --pidfile "$PIDFILE" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do
    answers && { echo "docker engine: started ($(docker version --format '{{.Server.Version}}'))"; return; }
    sleep 1
  done
  tail -n 20 "$LOG" >&2
  echo "dockerd did not answer within 60 s" >&2
  exit 1
}

stop() {
  [ -s "$PIDFILE" ] || { echo "docker engine: not started by docker-engine.sh, left running"; return; }
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    echo "docker engine: stopped (dockerd $pid)"
  fi
  rm -f "$PIDFILE"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
