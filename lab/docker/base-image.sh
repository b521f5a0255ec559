#!/usr/bin/env bash
# A Debian base image for the Docker lab, made with debootstrap: what
# `make lab-docker LAB_BASE_IMAGE=...` needs of a base image (Python 3.11 with venv,
# dig, dnsmasq, ip), so that building the lab's image needs no network at all.
#
#   lab/docker/base-image.sh          print the image's tag, making it first if needed
#
# The image is cached by content: its tag and the root file system's tarball
# (under LAB_CACHE, default /var/cache/kumazone-lab, outside any checkout) are named
# by a hash of this script, which holds the package list, and of the suite and the
# architecture.  A run with a cached tarball only imports it; a run whose daemon
# has the tag already does nothing.  Root is needed (debootstrap); messages go to
# stderr, the tag alone to stdout.
#
# LAB_BASE_SUITE (bookworm), LAB_BASE_MIRROR (http://deb.debian.org/debian), LAB_CACHE.
set -euo pipefail

SUITE=${LAB_BASE_SUITE:-bookworm}
MIRROR=${LAB_BASE_MIRROR:-http://deb.debian.org/debian}
CACHE=${LAB_CACHE:-/var/cache/kumazone-lab}
PACKAGES=python3,python3-venv,bind9-dnsutils,dnsmasq-base,iproute2
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "lab: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null || die "docker not found (apt-get install docker.io)"
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
key=$( { cat "${BASH_SOURCE[0]}"; echo "$SUITE $arch"; } | sha256sum | cut -c1-16)
tag="kumazone-lab-base:$key"
tarball="$CACHE/base-$SUITE-$arch-$key.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  say "base image $tag (cached in the daemon)"
  echo "$tag"
  exit 0
fi

if [[ ! -s $tarball ]]; then
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  ((EUID == 0)) || die "debootstrap needs root"
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/root.XXXXXX")
  trap 'rm -rf "$root" "$tarball.part"' EXIT
  say "debootstrap $SUITE ($arch, minbase + $PACKAGES) from $MIRROR: a few minutes, once"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
    >"$root.log" 2>&1; then
    tail -n 20 "$root.log" >&2
    die "debootstrap failed (log: $root.log)"
  fi
  rm -f "$root.log"
  # Nothing of this host goes into the image: Docker writes these at run time.
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  : >"$root/etc/hosts"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  rm -rf "${root:?}"/dev/* "$root"/tmp/* "$root"/var/log/*.log
  tar --numeric-owner -C "$root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
  rm -rf "$root"
  trap - EXIT
fi

say "importing $tarball as $tag"
docker import --change "ENV PATH=$IMAGE_PATH" --change 'CMD ["/bin/bash"]' \
  "$tarball" "$tag" >/dev/null
echo "$tag"
