#!/usr/bin/env bash
# .ci/docker-down.sh -- stop the dockerd started by .ci/docker-up.sh (local helper).
# Only stops the daemon recorded in the docker-up pidfile; a daemon started any other way
# (systemd, by hand) is left alone. Containers are stopped by dockerd on shutdown;
# images and /var/lib/docker are kept, so the next docker-up is fast.
set -euo pipefail

PIDFILE=${SHIPYARD_DOCKERD_PIDFILE:-/tmp/shipyard-dockerd.pid}
log() { printf '[docker-down] %s\n' "$*" >&2; }

if [[ ! -f $PIDFILE ]]; then
    log "no pidfile $PIDFILE: nothing started by docker-up"
    exit 0
fi
pid=$(cat "$PIDFILE" 2>/dev/null || true)
if ! [[ $pid =~ ^[0-9]+$ ]] || [[ $(cat "/proc/$pid/comm" 2>/dev/null) != dockerd ]]; then
    log "pid '$pid' from $PIDFILE is not a running dockerd; removing stale pidfile"
    rm -f "$PIDFILE"
    exit 0
fi

log "stopping dockerd pid $pid"
kill -TERM "$pid"
for _ in $(seq 1 60); do # dockerd gives containers up to 10 s (+ its own shutdown)
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
done
if kill -0 "$pid" 2>/dev/null; then
    log "dockerd did not exit after 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
fi
rm -f "$PIDFILE"
log "stopped"
