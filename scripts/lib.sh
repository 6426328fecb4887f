# shellcheck shell=bash
# Shared by scripts/run, scripts/test and scripts/bench: install what is missing, make the venv.
# Sourced, never run. Expects REPO to be set to the repository root.

log() { printf '%s\n' "snapvol: $*" >&2; }
die() { printf '%s\n' "snapvol: error: $*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "run me as root (I mount filesystems and talk to dockerd)"
}

# ensure_packages PKG... : apt-get install the Debian packages that are not installed yet.
ensure_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# ensure_command CMD PKG : install Debian package PKG unless CMD is already on PATH (so a
# Docker installed from docker.com's packages is used as it is, never replaced).
ensure_command() {
  command -v "$1" >/dev/null 2>&1 || ensure_packages "$2"
}

# The packages the plugin needs at run time.
RUNTIME_PACKAGES=(btrfs-progs python3-btrfsutil python3-venv python3-flask gunicorn python3-docker python3-tqdm python3-prometheus-client e2fsprogs
  util-linux zstd python3-xxhash)

# docker_answers [DOCKER_HOST]: true if a Docker engine answers.
docker_answers() { timeout 20 docker info >/dev/null 2>&1; }

# ensure_venv [EXTRAS]: a virtualenv in $REPO/.venv made from Debian's python3 (it needs
# python3-btrfsutil from Debian, which other interpreters cannot see), with snapvol in it.
ensure_venv() {
  local extras="${1:-}" venv="$REPO/.venv"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import btrfsutil, flask' 2>/dev/null; then
    rm -rf "$venv"
    log "creating $venv (Debian's /usr/bin/python3, with system site-packages)"
    /usr/bin/python3 -m venv --system-site-packages "$venv" || die "cannot create $venv"
  fi
  local stamp="$venv/.snapvol-installed$extras"
  if [ ! -f "$stamp" ] || [ "$REPO/setup.cfg" -nt "$stamp" ]; then
    log "installing snapvol${extras} into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation \
      -e "$REPO$extras" >/dev/null || die "pip install of snapvol failed"
    touch "$stamp"
  fi
}

# debian_mirror: the Debian mirror this host's apt uses (for debootstrap), or deb.debian.org.
debian_mirror() {
  local uri=""
  if [ -n "${SNAPVOL_DEBIAN_MIRROR:-}" ]; then echo "$SNAPVOL_DEBIAN_MIRROR"; return; fi
  uri="$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
         | grep -v security | head -n1)"
  [ -n "$uri" ] || uri="$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' \
         | grep -v security | head -n1)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# ensure_debian_base IMAGE: a Debian bookworm base image in the local engine, made with
# debootstrap when none can be pulled (no registry is reachable on some machines). The
# debootstrap tree is cached as a tarball in $SNAPVOL_BUILD_CACHE (/var/cache/snapvol-build),
# so later engines (the tests' private ones) only import it.
ensure_debian_base() {
  local image="$1" cache="${SNAPVOL_BUILD_CACHE:-/var/cache/snapvol-build}" root tarball
  docker image inspect "$image" >/dev/null 2>&1 && return 0
  tarball="$cache/debian-bookworm-minbase.tar"
  if [ ! -s "$tarball" ]; then
    ensure_command debootstrap debootstrap
    mkdir -p "$cache"
    root="$(mktemp -d /tmp/snapvol-debootstrap.XXXXXX)"
    log "making a Debian base with debootstrap from $(debian_mirror) (about a minute, once)"
    if ! debootstrap --variant=minbase bookworm "$root" "$(debian_mirror)" >"$root.log" 2>&1; then
      tail -n 20 "$root.log" >&2; rm -rf --one-file-system "$root" "$root.log"
      die "debootstrap failed"
    fi
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
      "$root"/usr/share/man/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf --one-file-system "$root" "$root.log"
  fi
  docker import - "$image" <"$tarball" >/dev/null || die "docker import of $image failed"
}

# Debian packages the OpenZFS test VM needs beyond OpenZFS itself (see scripts/test).
ZFSVM_PACKAGES="python3-pytest python3-flask python3-btrfsutil btrfs-progs gunicorn python3-docker python3-yaml python3-tqdm python3-prometheus-client docker.io docker-registry openssh-server openssh-client"
