#!/usr/bin/env bash
# .ci/docker-up.sh -- make a local Docker engine + registry-free test images available.
#
# Idempotent. Safe to run repeatedly and concurrently (serialised by flock).
#   1. apt-installs docker.io busybox-static nginx if missing (needs root / package registry only)
#   2. starts `dockerd` in the background unless a daemon already answers `docker info`
#      (no bridge network, no iptables, host sysctls left untouched)
#   3. builds the shipyard-test/* images with `docker import` (no image registry needed)
#   4. smoke test: `docker run --rm --network none shipyard-test/busybox true`
#      (+ a host-network HTTP check of shipyard-test/web:v1 unless SHIPYARD_DOCKER_SMOKE=0)
# Exits non-zero with the tail of the dockerd log if the engine does not come up.
#
# Environment knobs (all optional):
#   SHIPYARD_DOCKERD_LOG              dockerd log file        (default /tmp/shipyard-dockerd.log)
#   SHIPYARD_DOCKERD_PIDFILE          pid of the dockerd we start (default /tmp/shipyard-dockerd.pid)
#   SHIPYARD_DOCKERD_TIMEOUT          seconds to wait for the engine (default 60)
#   SHIPYARD_DOCKERD_STORAGE_DRIVER   force a storage driver (default: dockerd's auto choice,
#                                     i.e. overlay2 here; falls back to vfs automatically if
#                                     the auto choice cannot run containers)
#   SHIPYARD_REBUILD_IMAGES=1         rebuild the test images even if present
#   SHIPYARD_DOCKER_SMOKE=0           skip the HTTP smoke test of the web image
# See docs/dev/docker-engine.md.
set -euo pipefail

LOG=${SHIPYARD_DOCKERD_LOG:-/tmp/shipyard-dockerd.log}
PIDFILE=${SHIPYARD_DOCKERD_PIDFILE:-/tmp/shipyard-dockerd.pid}
TIMEOUT=${SHIPYARD_DOCKERD_TIMEOUT:-60}
LOCKFILE=/tmp/shipyard-docker-up.lock
# Bump when the image recipe below changes: images with another revision label get rebuilt.
IMAGE_REV=1
REV_LABEL=org.shipyard.test-image-rev

# --bridge=none      : no docker0 bridge (containers use network_mode host or none only)
# --iptables=false   : do not touch iptables (no iptables/nft setup needed)
# --ip-forward=false : otherwise dockerd flips net.ipv4.ip_forward to 1 on the host
DOCKERD_FLAGS=(--bridge=none --iptables=false --ip-forward=false)

PKGS=(docker.io busybox-static nginx)
BUSYBOX=/bin/busybox

log() { printf '[docker-up] %s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

die() {
    log "ERROR: $*"
    if [[ -f $LOG ]]; then
        log "---- last 40 lines of $LOG ----"
        tail -n 40 "$LOG" >&2 || true
        log "---- end of $LOG ----"
    fi
    exit 1
}

TMP_DIRS=()
cleanup() { ((${#TMP_DIRS[@]} == 0)) || rm -rf "${TMP_DIRS[@]}"; }
trap cleanup EXIT

SUDO=()
if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); fi
fi

# ---------------------------------------------------------------- 1. packages
install_packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    log "installing ${missing[*]} (apt-get)"
    local t0; t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get -qq update || die "apt-get update failed"
    "${SUDO[@]}" apt-get -qq -y -o Dpkg::Use-Pty=0 install "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    log "packages installed in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- 2. daemon
engine_answers() { docker info >/dev/null 2>&1; }

# Our dockerd (from the pidfile) if it is still alive, else empty.
our_pid() {
    local pid
    [[ -f $PIDFILE ]] || return 0
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        echo "$pid"
    fi
}

stop_our_dockerd() {
    local pid; pid=$(our_pid)
    [[ -n $pid ]] || return 0
    log "stopping dockerd pid $pid"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
}

# A dockerd (not started by us) may own /var/run/docker.pid: wait for it, or drop a stale file.
handle_foreign_pidfile() {
    local f=/var/run/docker.pid pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f" 2>/dev/null || true)
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        log "a dockerd (pid $pid) is running but not answering yet; waiting up to ${TIMEOUT} s"
        local deadline=$((SECONDS + TIMEOUT))
        while ((SECONDS < deadline)); do
            engine_answers && return 0
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        engine_answers || die "dockerd pid $pid (not started by docker-up) does not answer"
    else
        log "removing stale $f (pid '$pid' is not a dockerd)"
        rm -f "$f"
    fi
}

# start_dockerd [extra flags...] -> 0 when `docker info` answers within TIMEOUT
start_dockerd() {
    command -v dockerd >/dev/null 2>&1 || die "dockerd not found (is docker.io installed?)"
    [[ $EUID -eq 0 ]] || die "need root to start dockerd (run as root or start the engine yourself)"
    local flags=("${DOCKERD_FLAGS[@]}" "$@")
    echo "=== $(date -u +%FT%TZ) docker-up: dockerd ${flags[*]}" >>"$LOG"
    local t0; t0=$(now)
    rm -f "$PIDFILE"
    # setsid: own session, so the daemon survives the CI step / shell that started it.
    # 9>&-: the daemon must not inherit (and so hold forever) the flock fd of this script.
    # The inner shell writes its own pid (= dockerd's after exec) whether or not setsid forks.
    # shellcheck disable=SC2016  # expanded by the inner shell
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' docker-up "$PIDFILE" \
        dockerd "${flags[@]}" </dev/null >>"$LOG" 2>&1 9>&- &
    local pid="" deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        [[ -n $pid ]] || pid=$(cat "$PIDFILE" 2>/dev/null || true)
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "dockerd (pid $pid) exited during start-up"
            rm -f "$PIDFILE"
            return 1
        fi
        if [[ -S /var/run/docker.sock ]] && engine_answers; then
            DOCKERD_START_SECONDS=$(elapsed "$t0")
            log "started dockerd ${flags[*]} (pid $pid, log $LOG); answers after ${DOCKERD_START_SECONDS} s"
            return 0
        fi
        sleep 0.1
    done
    log "dockerd did not answer 'docker info' within ${TIMEOUT} s"
    return 1
}

# ---------------------------------------------------------------- 3. images
image_current() {
    local rev
    rev=$(docker image inspect -f "{{ index .Config.Labels \"$REV_LABEL\" }}" "$1" 2>/dev/null) || return 1
    [[ $rev == "$IMAGE_REV" ]]
}

# The busybox rootfs (/bin/busybox + applet symlinks, /etc/passwd, /tmp) is made once per run
# in $BASE_ROOTFS; web images add a small /www tree to the same tar stream (no copying).
BASE_ROOTFS=""
make_base_rootfs() {
    [[ -z $BASE_ROOTFS ]] || return 0
    BASE_ROOTFS=$(mktemp -d /tmp/shipyard-rootfs.XXXXXX)
    TMP_DIRS+=("$BASE_ROOTFS")
    local b=$BASE_ROOTFS applet
    chmod 0755 "$b"
    mkdir -p "$b/bin" "$b/etc" "$b/tmp" "$b/root"
    chmod 1777 "$b/tmp"
    cp "$BUSYBOX" "$b/bin/busybox"
    chmod 0755 "$b/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$b/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$b/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$b/etc/group"
}

# make_www DIR VERSION : DIR/www/{index.html,healthz}
make_www() {
    mkdir -p "$1/www"
    printf 'version %s' "$2" >"$1/www/index.html" # exactly "version vN", no trailing newline
    printf 'ok' >"$1/www/healthz"
}

# import_image TAG EXTRA_DIR|"" [--change ...]
# rootfs = base rootfs + EXTRA_DIR/www; removes the image it replaces (if no container uses it).
import_image() {
    local tag=$1 extra=$2; shift 2
    local old new srcs=(-C "$BASE_ROOTFS" .)
    [[ -z $extra ]] || srcs+=(-C "$extra" ./www)
    old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
    tar --sort=name --numeric-owner --owner=0 --group=0 --mtime='2020-01-01 00:00:00Z' -c "${srcs[@]}" |
        docker import \
            --change "LABEL $REV_LABEL=$IMAGE_REV" \
            --change 'ENV PATH=/bin' \
            "$@" -m "shipyard test image rev $IMAGE_REV (.ci/docker-up.sh)" - "$tag" >/dev/null \
        || die "docker import $tag failed"
    new=$(docker image inspect -f '{{.Id}}' "$tag")
    if [[ -n $old && $old != "$new" ]]; then
        docker rmi "$old" >/dev/null 2>&1 || true # still used by a container: leave it
    fi
}

# The web command: sh is PID 1 and traps TERM/INT so `docker stop` returns at once
# (a bare `httpd` as PID 1 ignores SIGTERM and `docker stop` would wait its 10 s timeout).
# `wait $!` propagates httpd's exit status (e.g. 1 on "Address already in use").
# shellcheck disable=SC2016  # ${PORT} / $! are for the container's sh
WEB_CMD='CMD ["/bin/sh", "-c", "trap \"exit 0\" TERM INT; /bin/busybox httpd -f -p 127.0.0.1:${PORT:-8081} -h /www & wait $!"]'
BROKEN_CMD='CMD ["/bin/sh", "-c", "trap \"exit 0\" TERM INT; /bin/busybox sleep 3600 & wait $!"]'

build_images() {
    local force=${SHIPYARD_REBUILD_IMAGES:-0}
    [[ -x $BUSYBOX ]] || die "$BUSYBOX missing (busybox-static not installed?)"
    if ! "$BUSYBOX" --list >/dev/null 2>&1; then die "$BUSYBOX is not usable"; fi
    local tmp t0 built=()
    tmp=$(mktemp -d /tmp/shipyard-images.XXXXXX)
    TMP_DIRS+=("$tmp")
    t0=$(now)

    if [[ $force == 1 ]] || ! image_current shipyard-test/busybox:latest; then
        make_base_rootfs
        import_image shipyard-test/busybox:latest "" --change 'CMD ["/bin/sh"]'
        built+=(shipyard-test/busybox:latest)
    fi
    local v
    for v in v1 v2 broken; do
        if [[ $force == 1 ]] || ! image_current "shipyard-test/web:$v"; then
            make_base_rootfs
            make_www "$tmp/$v" "$v"
            local cmd=$WEB_CMD
            [[ $v != broken ]] || cmd=$BROKEN_CMD
            import_image "shipyard-test/web:$v" "$tmp/$v" \
                --change 'ENV PORT=8081' --change 'EXPOSE 8081' --change "$cmd"
            built+=("shipyard-test/web:$v")
        fi
    done
    if ((${#built[@]})); then
        log "built ${built[*]} in $(elapsed "$t0") s"
    else
        log "test images up to date (rev $IMAGE_REV)"
    fi
    rm -rf "$tmp" "${BASE_ROOTFS:-/nonexistent}"
    BASE_ROOTFS=""
}

# ---------------------------------------------------------------- 4. smoke tests
smoke_run() {
    docker run --rm --network none shipyard-test/busybox:latest true 2>&1
}

free_port() {
    # ask the kernel for a free port; fall back to a fixed one
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        2>/dev/null || echo 18081
}

smoke_http() {
    [[ ${SHIPYARD_DOCKER_SMOKE:-1} != 0 ]] || return 0
    command -v curl >/dev/null 2>&1 || { log "curl missing, skipping HTTP smoke test"; return 0; }
    local port cid body="" ok=0
    port=$(free_port)
    cid=$(docker run -d --network host -e "PORT=$port" --label org.shipyard.test=docker-up-smoke \
        shipyard-test/web:v1) || die "could not start shipyard-test/web:v1"
    for _ in $(seq 1 50); do
        body=$(curl -fsS --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null) && { ok=1; break; }
        sleep 0.1
    done
    if ((ok)) && [[ $body == "version v1" ]]; then
        docker rm -f "$cid" >/dev/null 2>&1 || true
        log "HTTP smoke test ok (host network, 127.0.0.1:$port -> '$body')"
    else
        docker logs "$cid" >&2 2>&1 || true
        docker rm -f "$cid" >/dev/null 2>&1 || true
        die "HTTP smoke test failed: got '$body' from 127.0.0.1:$port"
    fi
}

# ---------------------------------------------------------------- main
main() {
    exec 9>"$LOCKFILE"
    if ! flock -w 300 9; then
        log "ERROR: another docker-up.sh held $LOCKFILE for 300 s (fuser -v $LOCKFILE shows who)"
        exit 1
    fi

    install_packages
    command -v docker >/dev/null 2>&1 || die "docker CLI not found"

    local started=0 driver=${SHIPYARD_DOCKERD_STORAGE_DRIVER:-}
    if engine_answers; then
        log "a Docker daemon already answers ($(docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?')); not starting one"
    else
        stop_our_dockerd       # stale pidfile / half-dead daemon of ours
        handle_foreign_pidfile # someone else's dockerd still starting, or a stale /var/run/docker.pid
        if ! engine_answers; then
            if [[ -n $driver ]]; then
                start_dockerd --storage-driver="$driver" || die "dockerd did not come up"
            elif ! start_dockerd; then
                log "retrying with --storage-driver=vfs"
                stop_our_dockerd
                driver=vfs
                start_dockerd --storage-driver=vfs || die "dockerd did not come up (also tried vfs)"
            fi
            started=1
        fi
    fi

    build_images
    local out
    if ! out=$(smoke_run); then
        # The auto-selected storage driver may start but fail to mount container layers
        # (e.g. overlay2 on top of overlayfs). Retry once with vfs if it is our daemon.
        if ((started)) && [[ -z $driver ]]; then
            log "container smoke test failed ($out); restarting dockerd with --storage-driver=vfs"
            stop_our_dockerd
            start_dockerd --storage-driver=vfs || die "dockerd did not come up with vfs"
            build_images
            out=$(smoke_run) || die "docker run --rm --network none shipyard-test/busybox true failed: $out"
        else
            die "docker run --rm --network none shipyard-test/busybox true failed: $out"
        fi
    fi
    log "container smoke test ok (storage driver: $(docker info -f '{{.Driver}}' 2>/dev/null))"
    smoke_http
    log "engine ready"
}

main "$@"
