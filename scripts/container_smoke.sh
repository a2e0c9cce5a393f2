#!/usr/bin/env bash
# Container smoke test that needs no Docker engine and no registry.
#
#   scripts/container_smoke.sh OUT_DIR [BIDS_DIR]
#
# 1. builds a Debian bookworm root file system with debootstrap and imports it as the local
#    image localhost/ms3seg-base:bookworm (cached in $MS3SEG_SMOKE_CACHE);
# 2. builds ./Dockerfile on it: buildah bud --isolation chroot, WITH_FSL=0, CPU TensorFlow
#    (PIP_EXTRAS=), the host's CA bundle and local wheel folder bind-mounted for pip;
# 3. runs the image with podman --runtime runc, read-only (--tmpfs /tmp only), as uid 1000,
#    without network, on BIDS_DIR (default bids_example/): participant into OUT_DIR/derivatives,
#    then group on the same folder.
# The pytest module tests/test_container.py calls this and compares the outputs with a run
# outside the container. Needs root, debootstrap, buildah, podman and runc (Debian packages),
# and network to the Debian mirror and PyPI at build time only.
#
# Environment:
#   MS3SEG_SMOKE_CACHE  where the base rootfs is kept  (default /var/tmp/ms3seg-smoke)
#   DEBIAN_MIRROR       (default http://deb.debian.org/debian)
#   MS3SEG_IMAGE        tag of the built image          (default localhost/ms3seg:smoke-<hash of the
#                       build context's files>: a changed tree is never run from a stale image)
#   MS3SEG_REBUILD=1    build the image even if the tag exists
set -euo pipefail

OUT=${1:?usage: container_smoke.sh OUT_DIR [BIDS_DIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIDS=${2:-$ROOT/bids_example}
CACHE=${MS3SEG_SMOKE_CACHE:-/var/tmp/ms3seg-smoke}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/ms3seg-base:bookworm
IMAGE=${MS3SEG_IMAGE:-}
if [ -z "$IMAGE" ]; then
  # tag by the content of the files the build context holds (git's tracked and untracked, not
  # ignored): an image built from another tree is never reused; without git, always rebuild
  if CTX=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | sort -z | xargs -0 sha256sum | sha256sum) \
      && [ -n "$CTX" ]; then
    IMAGE=localhost/ms3seg:smoke-${CTX:0:16}
  else
    IMAGE=localhost/ms3seg:smoke
    MS3SEG_REBUILD=1
  fi
fi
# Without explicit limits the runtime asks for more than a sandbox allows: pass the current
# hard limits (raising them is not permitted there).
NOFILE=$(ulimit -Hn); NPROC=$(ulimit -Hu)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
[ "$NPROC" = unlimited ] && NPROC=1048576
# buildah itself runs with at most 32768 processes here, whatever the shell's limit
[ "$NPROC" -gt 32768 ] && NPROC=32768
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")

for tool in debootstrap buildah podman runc; do
  command -v "$tool" >/dev/null || { echo "container_smoke: $tool not found (apt-get install $tool)" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "container_smoke: debootstrap and buildah need root" >&2; exit 3; }
log() { echo "[container_smoke $(date +%T)] $*"; }

# 1. local base image ----------------------------------------------------------------------
if ! podman image exists "$BASE"; then
  if [ ! -f "$CACHE/rootfs/.complete" ]; then
    log "debootstrap bookworm -> $CACHE/rootfs"
    rm -rf "$CACHE/rootfs"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase bookworm "$CACHE/rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    touch "$CACHE/rootfs/.complete"
  fi
  log "importing the rootfs as $BASE"
  tar --exclude=./.complete -C "$CACHE/rootfs" -c . | podman import - "$BASE" >/dev/null
fi

# 2. build ---------------------------------------------------------------------------------
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg WITH_FSL=0 --build-arg PIP_EXTRAS=)
CA=/etc/ssl/certs/ca-certificates.crt
if [ -f "$CA" ]; then
  BUILD_ARGS+=(-v /etc/ssl/certs:/host-certs:ro --build-arg PIP_CERT=/host-certs/ca-certificates.crt)
fi
# pip on this machine takes some wheels (torch's CPU build) from a local folder
WHEELS=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  BUILD_ARGS+=(-v "$WHEELS:/host-wheels:ro" --build-arg PIP_FIND_LINKS=/host-wheels)
fi
if [ "${MS3SEG_REBUILD:-0}" = 1 ] || ! podman image exists "$IMAGE"; then
  log "buildah bud -> $IMAGE"
  # docker format: the OCI format drops the SHELL instruction (bash with pipefail)
  buildah bud --isolation chroot --format docker "${ULIMITS[@]}" "${BUILD_ARGS[@]}" --layers \
    -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT"
  # smoke images of earlier trees only take disk space (their shared layers stay)
  podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/ms3seg:smoke' | grep -vxF "$IMAGE" \
    | xargs -r podman rmi >/dev/null 2>&1 || true
fi

# 3. run, read-only and non-root -----------------------------------------------------------
mkdir -p "$OUT/derivatives"
chmod 0777 "$OUT/derivatives"   # the container's uid 1000 writes here
RUN=(podman --runtime runc run --rm --read-only --tmpfs /tmp:rw,size=4g,mode=1777 --user 1000:1000
     --network none "${ULIMITS[@]}"
     -v "$BIDS:/data:ro" -v "$OUT/derivatives:/out")
log "ms3seg --info"
"${RUN[@]}" "$IMAGE" --info | tee "$OUT/version.txt"
log "participant"
"${RUN[@]}" "$IMAGE" /data /out participant --nprocs 1 2>&1 | tee "$OUT/participant.log"
log "group"
"${RUN[@]}" "$IMAGE" /data /out group 2>&1 | tee "$OUT/group.log"
podman image inspect --format '{{.Size}}' "$IMAGE" > "$OUT/image_size_bytes.txt"
log "done: $(cat "$OUT/image_size_bytes.txt") bytes image; outputs in $OUT/derivatives"
