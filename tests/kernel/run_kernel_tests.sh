#!/usr/bin/env bash
# Kernel tests (called by .ci/run after the workspace tests): builds the kernel, installs its
# kernelspec into a private virtualenv, warms evcxr's build cache, then runs
#   - jupyter_kernel_test (Jupyter's conformance suite),
#   - protocol tests (signatures, display updates, interrupt, panics, compile errors),
#   - nbclient notebook execution.
# Env: CARGO_TARGET_DIR (default target/), KERNEL_TEST_VENV (default $CARGO_TARGET_DIR/kernel-venv),
#      DIFFEXPLAINER_KERNEL_CACHE (evcxr's shared build dir; default ~/.cache/diffexplainer-kernel).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=${KERNEL_TEST_VENV:-$TARGET/kernel-venv}
export DIFFEXPLAINER_KERNEL_NAME=${DIFFEXPLAINER_KERNEL_NAME:-diffexplainer-rust-test}

rustup component add rust-src >/dev/null 2>&1 || echo "warning: could not add rust-src (evcxr completions need it)"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q jupyter_kernel_test nbclient nbformat jupyter_client pyzmq

time cargo build --release -p diffexplainer-kernel
BIN="$TARGET/release/diffexplainer-kernel"
"$BIN" install --prefix "$VENV" --name "$DIFFEXPLAINER_KERNEL_NAME" --display-name "Rust (diffexplainer, test)"

echo "== warming evcxr's build cache (compiles the library once) =="
time "$BIN" warm

export JUPYTER_PATH="$VENV/share/jupyter"
export JUPYTER_PLATFORM_DIRS=1
cd "$ROOT/tests/kernel"
"$VENV/bin/python" -m unittest -v test_kernel_spec.py test_protocol.py test_notebooks.py test_rich_types.py
