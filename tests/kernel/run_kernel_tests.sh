#!/usr/bin/env bash
# Kernel tests (called by .ci/run after the workspace tests): builds the kernel, installs it (its
# kernelspec, executable and library snapshot) into a private virtualenv, warms evcxr's build
# cache, then runs
#   - jupyter_kernel_test (Jupyter's conformance suite),
#   - protocol tests (signatures, display updates, interrupt, panics, compile errors),
#   - nbclient notebook execution,
#   - the browser test: JupyterLab on 127.0.0.1 and Debian's chromium (headless, via Playwright)
#     rendering an executed notebook, asserted on the screenshot's pixels (needs /usr/bin/chromium:
#     `apt-get install chromium`; .ci/run installs it).
# Env: CARGO_TARGET_DIR (default target/), KERNEL_TEST_VENV (default $CARGO_TARGET_DIR/kernel-venv),
#      DIFFEXPLAINER_KERNEL_CACHE (evcxr's shared build dir; default ~/.cache/diffexplainer-kernel),
#      KERNEL_BROWSER_TEST=0 to skip the browser test, CHROMIUM (default /usr/bin/chromium),
#      BROWSER_TEST_OUT (screenshots; default $CARGO_TARGET_DIR/browser-test).
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
# jupyterlab (4: the browser test uses its CSS classes), playwright (its driver only: the browser
# is Debian's chromium), pillow: for the browser test
time "$VENV/bin/pip" install -q jupyter_kernel_test nbclient nbformat jupyter_client pyzmq \
  "jupyterlab>=4,<5" playwright pillow

# --workspace, not -p diffexplainer-kernel: features are unified over the whole workspace as in
# `cargo test --release --workspace` (run just before by .ci/run), so the dependencies built
# there are reused; with -p, cargo resolves the kernel alone and rebuilds the rust-analyzer
# crates (about 7 minutes on 2 cores).
time cargo build --release --workspace --bins
# Install as a user would, but from a temporary copy of the checkout that is deleted right after:
# every test below then runs the installed kernel (its own copy of the executable and a snapshot
# of the library in the kernelspec directory), and test_install.py checks nothing points back.
# `cp -a` keeps mtimes, which the snapshot keeps too, so evcxr's cache stays fresh across runs.
export KERNEL_INSTALL_SOURCE=$(mktemp -d)/checkout
mkdir -p "$KERNEL_INSTALL_SOURCE/vendor"
cp -a Cargo.toml Cargo.lock lib "$KERNEL_INSTALL_SOURCE/"
cp -a vendor/candle-core "$KERNEL_INSTALL_SOURCE/vendor/"
time "$TARGET/release/diffexplainer-kernel" install --prefix "$VENV" --name "$DIFFEXPLAINER_KERNEL_NAME" \
  --display-name "Rust (diffexplainer, test)" --source "$KERNEL_INSTALL_SOURCE"
rm -rf "$(dirname "$KERNEL_INSTALL_SOURCE")"
BIN="$VENV/share/jupyter/kernels/$DIFFEXPLAINER_KERNEL_NAME/diffexplainer-kernel"

echo "== warming evcxr's build cache (compiles the library once) =="
time "$BIN" warm

export JUPYTER_PATH="$VENV/share/jupyter"
export JUPYTER_PLATFORM_DIRS=1
cd "$ROOT/tests/kernel"
rc=0
"$VENV/bin/python" -m unittest -v test_install.py test_kernel_spec.py test_protocol.py test_cell_contract.py \
  test_output_framing.py test_notebooks.py test_rich_types.py || rc=$?

if [ "${KERNEL_BROWSER_TEST:-1}" = 0 ]; then
  echo "== browser test skipped (KERNEL_BROWSER_TEST=0) =="
else
  echo "== browser test (JupyterLab + headless chromium) =="
  # A hard limit on top of the test's own timeouts (it takes ~1 min). `timeout` signals the
  # process group: JupyterLab shuts down the kernels it started, chromium exits with Playwright's
  # driver, and the test's own cleanup (SIGTERM handler) shuts down nbclient's kernel.
  export BROWSER_TEST_OUT=${BROWSER_TEST_OUT:-$TARGET/browser-test}
  brc=0
  timeout -k 30 600 "$VENV/bin/python" -m unittest -v test_browser.py || brc=$?
  [ "$brc" = 124 ] && echo "browser test: timed out after 600 s (see $BROWSER_TEST_OUT/jupyterlab.log)"
  [ "$brc" = 0 ] || rc=$brc
fi
exit $rc
