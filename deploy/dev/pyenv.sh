#!/usr/bin/env bash
# The Python environment of mxrec's interop tests: aiortc (an independent WebRTC implementation)
# drives tests/peers/*.py as the remote caller of the recorder's WebRTC edge, and LiveKit's Python
# SDK (its wheel carries libwebrtc and LiveKit's frame cryptor) drives tests/peers/livekit_publisher.py
# as an Element-Call-style MatrixRTC publisher.
#
#   deploy/dev/pyenv.sh        # create/repair the venv if needed, print its python path on stdout
#
# The venv lives at $MXREC_PY_VENV (default ~/.cache/mxrec/py-venv). It is only (re)installed when
# the pinned versions below are not already there, so running this before every test is cheap.
# The Rust tests find the interpreter through $MXREC_TEST_PYTHON, or at the default venv path.
# Failures say what went wrong on stderr and exit non-zero.
set -euo pipefail

# Pinned together: aiortc 1.16.0 accepts av >=14,<20; 18.1.0 is what pip resolved for it.
# numpy draws the synthetic frames (aiortc itself does not need it).
# livekit 1.2.1 is the newest SDK; it has per-participant keys with HKDF key derivation
# (KeyProviderOptions.key_derivation_function), which Element Call's E2EE needs.
AIORTC_VERSION=1.16.0
AV_VERSION=18.1.0
NUMPY_VERSION=2.4.6
LIVEKIT_VERSION=1.2.1
VENV=${MXREC_PY_VENV:-$HOME/.cache/mxrec/py-venv}
PY=$VENV/bin/python

die() { echo "pyenv.sh: $*" >&2; exit 1; }

installed() {
    [[ -x $PY ]] && "$PY" -c "
import importlib.metadata as m, sys
want = {'aiortc': '$AIORTC_VERSION', 'av': '$AV_VERSION', 'numpy': '$NUMPY_VERSION',
        'livekit': '$LIVEKIT_VERSION'}
sys.exit(any(m.version(k) != v for k, v in want.items()))
" 2>/dev/null
}

if ! installed; then
    echo "pyenv.sh: installing aiortc $AIORTC_VERSION (av $AV_VERSION, numpy $NUMPY_VERSION)," \
        "livekit $LIVEKIT_VERSION into $VENV" >&2
    mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV")"
    [[ -x $PY ]] || python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (need python3 >= 3.10 with venv)"
    LOG=$VENV/pip.log
    "$PY" -m pip install --quiet --disable-pip-version-check \
        "aiortc==$AIORTC_VERSION" "av==$AV_VERSION" "numpy==$NUMPY_VERSION" \
        "livekit==$LIVEKIT_VERSION" >"$LOG" 2>&1 \
        || die "pip install aiortc==$AIORTC_VERSION av==$AV_VERSION numpy==$NUMPY_VERSION livekit==$LIVEKIT_VERSION failed; see $LOG"
    installed || die "aiortc/av/numpy/livekit still not importable at the pinned versions in $VENV"
fi
echo "$PY"
