#!/usr/bin/env bash
# Builds the p2ptrain image from the project's Dockerfile with buildah (no Docker engine, no registry
# needed), exports it as a docker-archive (what `kind load image-archive` takes) and checks it from the
# inside: `p2ptrain --help` as the non-root user, the p2ptrain module in the image's redis-server, the
# gradient function's readiness. Exits non-zero if the build or any check fails. Run as root (or it
# re-runs itself with sudo): buildah here uses the vfs driver and chroot isolation, which need neither
# a daemon nor user namespaces.
#
# Environment:
#   IMAGE          tag to build (default kind.local/p2ptrain:dev; Knative resolves tags to digests
#                  except under kind.local, ko.local and dev.local)
#   IMAGE_ARCHIVE  where the docker-archive goes (default build/p2ptrain-image.tar)
#   BASE_IMAGE     base image to build on; by default a local Debian bookworm + Python 3.11 base made
#                  with debootstrap (no registry needed), cached in the buildah store between runs
#   BUILDAH_ROOT   buildah's own store (default /var/tmp/p2ptrain-buildah), apart from the system's
#   DEBIAN_MIRROR  for debootstrap (default http://deb.debian.org/debian)
#   TORCH_INDEX_URL  take the CPU torch from this index (a mirror) instead of a local wheel
#   KEEP_IMAGE=1   keep the built image in the store (it is removed after export and checks otherwise)
#   CHECK_ONLY=1   only run the checks, on IMAGE as it is in the store (kept by KEEP_IMAGE=1)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$(id -u)" != 0 ]]; then
  exec sudo --preserve-env=IMAGE,IMAGE_ARCHIVE,BASE_IMAGE,BUILDAH_ROOT,DEBIAN_MIRROR,KEEP_IMAGE,CHECK_ONLY,TORCH_INDEX_URL,PIP_FIND_LINKS,PIP_CERT \
    "$0" "$@"
fi
image="${IMAGE:-kind.local/p2ptrain:dev}"
archive="${IMAGE_ARCHIVE:-$root/build/p2ptrain-image.tar}"
store="${BUILDAH_ROOT:-/var/tmp/p2ptrain-buildah}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export DEBIAN_FRONTEND=noninteractive
started=$SECONDS

bh() { buildah --root "$store/storage" --runroot "$store/run" --storage-driver vfs "$@"; }

install_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  [[ -n "${BASE_IMAGE:-}" ]] || command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ((${#missing[@]})); then
    echo "installing ${missing[*]} (Debian packages)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates debian-archive-keyring >/dev/null
  fi
}

# The local base: what the official python:3.11-slim-bookworm offers the Dockerfile (Python 3.11 with
# venv, apt, useradd), from Debian packages. Its tag carries a hash of this function, so a changed
# recipe makes a new base and an unchanged one is reused.
make_base() {
  local tag="$1" work ctr mnt
  base_work="$(mktemp -d /var/tmp/p2ptrain-base.XXXXXX)"
  work="$base_work"
  echo "making base image $tag (debootstrap bookworm minbase + python3 + python3-venv)"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; return 1; }
  cat >"$work/rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # As Debian's own container images do: apt keeps no downloaded packages or caches in a layer,
  # fetches no translations, and packages installed later leave their docs out.
  cat >"$work/rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
EOF
  cat >"$work/rootfs/etc/dpkg/dpkg.cfg.d/excludes" <<EOF
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/doc/* "$work"/rootfs/usr/share/man/* "$work"/rootfs/usr/share/info/* \
    "$work"/rootfs/usr/share/locale/*
  ctr="$(bh from scratch)"
  mnt="$(bh mount "$ctr")"
  tar -C "$work/rootfs" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
  bh umount "$ctr" >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label org.opencontainers.image.description="Debian bookworm + Python 3.11 (p2ptrain local base)" \
    "$ctr"
  # Security updates, as the official image's regular rebuilds would have them.
  bh run --isolation chroot "$ctr" -- sh -c \
    'apt-get update -qq && apt-get upgrade -y -qq >/dev/null && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin'
  bh commit --rm --quiet "$ctr" "$tag" >/dev/null
  rm -rf "$work"
}

# Sets $base (not echoed: make_base must run in this shell, so the EXIT trap cleans up after it).
base_image() {
  if [[ -n "${BASE_IMAGE:-}" ]]; then
    base="$BASE_IMAGE"
    return
  fi
  local hash tag old
  hash="$(declare -f make_base | sha256sum | cut -c1-12)"
  tag="localhost/p2ptrain-base:bookworm-$hash"
  if bh inspect --type image "$tag" >/dev/null 2>&1; then
    echo "reusing base image $tag"
  else
    make_base "$tag"
  fi
  # Bases from an older recipe only take disk space.
  for old in $(bh images --noheading --format '{{.Name}}:{{.Tag}}' localhost/p2ptrain-base 2>/dev/null); do
    [[ "$old" == "$tag" ]] || bh rmi "$old" >/dev/null 2>&1 || true
  done
  base="$tag"
}

# The Dockerfile takes a torch-2.13.0+cpu wheel from wheels/ when there is one. Where the local pip can
# find that wheel (find-links, a mirror), it goes there for this build; otherwise the image gets it from
# download.pytorch.org, as for users.
stage_torch_wheel() {
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    echo "torch: from $TORCH_INDEX_URL"
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    return
  fi
  local python="$root/.venv/bin/python"
  [[ -x "$python" ]] || python=python3
  "$python" -m pip --version >/dev/null 2>&1 || return 0
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --dest "$root/wheels" "torch==2.13.0+cpu" >/dev/null 2>&1 || true
  if ls "$root"/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    echo "torch: using the local wheel $(basename "$root"/wheels/torch-2.13.0+cpu-*.whl)"
  elif "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)' \
      https://download.pytorch.org/whl/cpu/torch/ >/dev/null 2>&1; then
    echo "torch: no local CPU wheel; the build installs it from download.pytorch.org/whl/cpu"
  else
    # Neither a CPU wheel nor the CPU index (a network that reaches PyPI alone): the image carries
    # PyPI's torch 2.13.0, the CUDA build, which also computes on the CPU but adds GBs. Its wheels are
    # kept in a wheelhouse on this machine, so only the first build downloads them.
    local wheelhouse="${P2PTRAIN_WHEELHOUSE:-$HOME/.cache/p2ptrain/wheelhouse}"
    echo "torch: no CPU wheel and download.pytorch.org unreachable: PyPI's torch==2.13.0 (CUDA build) from $wheelhouse"
    mkdir -p "$wheelhouse"
    "$python" -m pip download -q --dest "$wheelhouse" "torch==2.13.0"
    cp -l "$wheelhouse"/*.whl "$root/wheels/" 2>/dev/null || cp "$wheelhouse"/*.whl "$root/wheels/"
    build_args+=(--build-arg TORCH_VARIANT=pypi)
  fi
}

ctr=""
base_work=""
cleanup() {
  [[ -z "$base_work" ]] || rm -rf "$base_work"
  [[ -z "$ctr" ]] || bh rm "$ctr" >/dev/null 2>&1 || true
  rm -f "$root"/wheels/*.whl "$root/wheels/pip-ca.crt"
  if [[ "${KEEP_IMAGE:-}" != 1 && "${CHECK_ONLY:-}" != 1 ]]; then
    bh rmi "$image" >/dev/null 2>&1 || true
  fi
  # Intermediate (build-stage) images and dangling layers: vfs keeps a full copy of each.
  bh rmi --prune >/dev/null 2>&1 || true
}
trap cleanup EXIT

build_and_export() {
  base_image
  build_args=(--build-arg "BASE_IMAGE=$base")
  stage_torch_wheel
  # pip in the build trusts what pip here trusts: behind a TLS-intercepting proxy that is a local CA.
  local ca_bundle
  ca_bundle="$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)' 2>/dev/null || true)"
  ca_bundle="${PIP_CERT:-$ca_bundle}"
  if [[ -f "$ca_bundle" ]]; then
    cp "$ca_bundle" "$root/wheels/pip-ca.crt"
    build_args+=(--build-arg PIP_CA_BUNDLE=wheels/pip-ca.crt)
  fi

  echo "building $image on $base"
  local build_started=$SECONDS
  bh bud --isolation chroot --pull=false --layers=false "${build_args[@]}" \
    --tag "$image" --file "$root/Dockerfile" "$root"
  build_seconds=$((SECONDS - build_started))

  mkdir -p "$(dirname "$archive")"
  rm -f "$archive"
  bh push --quiet "$image" "docker-archive:$archive:$image"
}

in_image() { bh run --isolation chroot -v "$root/hack/image_checks.py:/opt/checks/image_checks.py:ro" "$ctr" -- "$@"; }

# Sets $failed when a check fails; each prints its own PASS/FAIL line.
run_checks() {
  echo "checking $image from the inside (buildah run, the image's own user and environment)"
  ctr="$(bh from --pull=false --quiet "$image")"
  local help command check output listed=1
  # shellcheck disable=SC2016  # $(id -u) is for the shell inside the image
  if help="$(in_image sh -c 'test "$(id -u)" = 10001 || { echo "runs as uid $(id -u), not 10001"; exit 1; }; p2ptrain --help' 2>&1)"; then
    for command in run peer function operator redis-module; do
      grep -qE "^\s+$command\s" <<<"$help" || listed=0
    done
  else
    listed=0
  fi
  if ((listed)); then
    echo "PASS help (uid 10001): p2ptrain --help lists run, peer, function, operator, redis-module"
  else
    echo "FAIL help: p2ptrain --help as uid 10001 listing run, peer, function, operator, redis-module: ${help:-no output}"
    failed=1
  fi
  for check in redis-module function; do
    if ! output="$(in_image python /opt/checks/image_checks.py "$check" 2>&1)"; then
      failed=1
      # A check that could not even start (no python, no checks file) has printed no verdict of its own.
      grep -q "^FAIL $check" <<<"$output" || output="FAIL $check: could not run in the image: $output"
    fi
    echo "$output"
  done
}

install_tools
mkdir -p "$store"
failed=0
if [[ "${CHECK_ONLY:-}" != 1 ]]; then
  build_and_export
fi
run_checks
if [[ "${CHECK_ONLY:-}" != 1 ]]; then
  printf 'image %s: build %d s, image %s (uncompressed), archive %s MB at %s; build, export and checks %d s\n' \
    "$image" "$build_seconds" "$(bh images --noheading --format '{{.Size}}' "$image" | head -1)" \
    "$(($(stat -c %s "$archive") / 1000000))" "$archive" "$((SECONDS - started))"
fi
if ((failed)); then
  echo "image checks FAILED"
  exit 1
fi
echo "image checks passed"
