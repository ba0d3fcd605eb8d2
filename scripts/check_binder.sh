#!/usr/bin/env bash
# Runs the Binder set-up (binder/postBuild) as repo2docker would, without Docker: a fresh clone
# of this checkout in a temporary directory, a clean HOME, the kernel installed into a fresh
# virtualenv standing in for the image's Python environment; then executes
# notebooks/quickstart.ipynb with that kernel through nbclient and times each step.
# Heavy (a full release build): a check script, not part of `cargo test`.
#   scripts/check_binder.sh [WORKDIR]      (default: a new temporary directory, removed after)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d)}
KEEP=${1:+1}
mkdir -p "$WORK"
echo "== check_binder in $WORK"
git clone -q "$ROOT" "$WORK/repo"
ORIG_HOME=$HOME
CARGO_BIN=$(dirname "$(command -v cargo)")
export HOME="$WORK/home"
mkdir -p "$HOME/.cargo"
python3 -m venv "$WORK/env"
"$WORK/env/bin/pip" install -q jupyter_client ipykernel nbclient nbformat
export NB_PYTHON_PREFIX="$WORK/env"
# The machine's Rust toolchain stands in for the one postBuild would fetch (it skips rustup when
# cargo is on PATH); the crate registry starts empty in the clean HOME, as on Binder.
export RUSTUP_HOME=${RUSTUP_HOME:-$ORIG_HOME/.rustup}
echo "export PATH=\"$CARGO_BIN:\$PATH\"" > "$HOME/.cargo/env"
export PATH="$CARGO_BIN:$PATH"
start=$(date +%s)
(cd "$WORK/repo" && /usr/bin/time -v binder/postBuild) 2> "$WORK/postBuild.time" | tail -5
echo "postBuild: $(( $(date +%s) - start )) s; peak memory $(grep 'Maximum resident' "$WORK/postBuild.time")"
export JUPYTER_PATH="$WORK/env/share/jupyter"
start=$(date +%s)
(cd "$WORK/repo" && binder/start "$WORK/env/bin/python" - <<'PY'
import nbformat
from nbclient import NotebookClient
nb = nbformat.read("notebooks/quickstart.ipynb", as_version=4)
NotebookClient(nb, timeout=900, kernel_name="diffexplainer-rust").execute()
errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
assert not errors, errors
assert images, "no image output"
print(f"quickstart: {len(nb.cells)} cells, {len(images)} image outputs, no errors")
PY
)
echo "first notebook run: $(( $(date +%s) - start )) s"
[ -n "$KEEP" ] || rm -rf "$WORK"
