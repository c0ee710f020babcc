#!/usr/bin/env bash
# Installs what building and testing mxrec needs on Debian 12, and nothing when it is already there.
# Used by `make demo` and `make test`, so a fresh machine needs no manual step.
#   install-deps.sh           build deps (FFmpeg dev libraries, clang, pkg-config, fonts) and what
#                             the demo's Synapse and aiortc venvs need (python3-venv, curl, ss)
#   install-deps.sh --test    plus the test servers: PostgreSQL, node (runs the link page's own
#                             script), Garage (S3) and LiveKit (built
#                             with Go >= 1.26, which must already be installed: Debian's is older)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

debs=(ffmpeg libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
      libswscale-dev libswresample-dev clang libclang-dev pkg-config fonts-dejavu-core
      ca-certificates curl python3 python3-venv iproute2)
[[ "${1:-}" == "--test" ]] && debs+=(postgresql nodejs)

missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "install-deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }

if [[ "${1:-}" == "--test" ]]; then
  "$here/garage.sh" install
  "$here/livekit.sh" build
fi
