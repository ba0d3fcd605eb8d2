"""A real browser: executes a small notebook through our kernel (nbclient), serves it with
JupyterLab on 127.0.0.1, opens it in Debian's chromium (headless, driven by Playwright, no
network) and asserts from the screenshot's pixels that both rendered images are there:

  - a 64x64 magenta square with a horizontal green stripe (rows 24..31), published with
    `show(..)` (display_data), and
  - a 64x64 magenta square with a vertical green stripe (columns 40..47), the cell's last
    expression `Image(..)` (execute_result).

Each must appear as one 64x64 region at 1:1 scale, with the right stripe, inside the bounding box
of the matching output element. Negative control: the same notebook with its outputs cleared,
opened the same way, shows no magenta at all (the page's own colours, syntax highlighting
included, do not count as magenta). Screenshots go to $BROWSER_TEST_OUT (default
$CARGO_TARGET_DIR/browser-test).

Env: CHROMIUM (default /usr/bin/chromium), DIFFEXPLAINER_KERNEL_NAME, BROWSER_TEST_OUT.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

import nbformat
from nbclient import NotebookClient

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.environ.get("BROWSER_TEST_OUT") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "browser-test")

SIZE = 64          # image side, px
STRIPE = (24, 32)  # green rows of the display_data image, [start, end)
VSTRIPE = (40, 48)  # green columns of the execute_result image

CELLS = [
    # 0: two 64x64 magenta squares, one with a horizontal green stripe, one with a vertical one
    "fn pattern(horizontal: bool) -> Tensor {\n"
    "    let mut v = vec![0f32; 3 * 64 * 64];\n"
    "    for y in 0..64 { for x in 0..64 {\n"
    f"        let stripe = if horizontal {{ ({STRIPE[0]}..{STRIPE[1]}).contains(&y) }} "
    f"else {{ ({VSTRIPE[0]}..{VSTRIPE[1]}).contains(&x) }};\n"
    "        let (r, g, b) = if stripe { (0., 1., 0.) } else { (1., 0., 1.) };\n"
    "        v[y * 64 + x] = r; v[64 * 64 + y * 64 + x] = g; v[2 * 64 * 64 + y * 64 + x] = b;\n"
    "    }}\n"
    "    Tensor::from_vec(v, (3, 64, 64), &Device::Cpu).unwrap()\n"
    "}\n"
    "let a = pattern(true);\nlet b = pattern(false);",
    # 1: display_data (show) then execute_result (Image as the last expression)
    "show(&display::image(&a).unwrap());\nImage(b.clone())",
]

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
    # nothing but the local server resolves
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]

# JupyterLab 4 without anything that reaches the network: no news feed, no update check, no
# PyPI extension listing, and the announcements plugin (which asks about news) disabled.
SERVER_CONFIG = {
    "ServerApp": {"open_browser": False, "disable_check_xsrf": True, "terminals_enabled": False,
                  "log_level": "DEBUG"},  # jupyterlab.log: kernel nudges and status messages
    "IdentityProvider": {"token": ""},
    "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
               "extension_manager": "readonly"},
}
PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}


def is_magenta(p):
    return p[0] > 200 and p[1] < 60 and p[2] > 200


def is_green(p):
    return p[0] < 60 and p[1] > 200 and p[2] < 60


def regions(png_path):
    """Connected (4-neighbour) regions of magenta-or-green pixels, largest first; each as
    dict(box=(x0, y0, x1, y1), magenta=n, green=n, pixels={(x, y): 'm'|'g'})."""
    from PIL import Image as PILImage
    im = PILImage.open(png_path).convert("RGB")
    w, h = im.size
    data = im.load()
    mask = {}
    for y in range(h):
        for x in range(w):
            p = data[x, y]
            if is_magenta(p):
                mask[(x, y)] = "m"
            elif is_green(p):
                mask[(x, y)] = "g"
    seen, out = set(), []
    for start in mask:
        if start in seen:
            continue
        seen.add(start)
        stack, pix = [start], {}
        while stack:
            x, y = stack.pop()
            pix[(x, y)] = mask[(x, y)]
            for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if n in mask and n not in seen:
                    seen.add(n)
                    stack.append(n)
        xs = [p[0] for p in pix]
        ys = [p[1] for p in pix]
        out.append({"box": (min(xs), min(ys), max(xs) + 1, max(ys) + 1), "pixels": pix,
                    "magenta": sum(1 for v in pix.values() if v == "m"),
                    "green": sum(1 for v in pix.values() if v == "g")})
    out.sort(key=lambda r: -len(r["pixels"]))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, timeout=10):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        return r.status, (json.loads(body) if body.strip().startswith((b"{", b"[")) else body)


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    # `timeout` (run_kernel_tests.sh) sends SIGTERM: unwind so the finally blocks stop
    # JupyterLab (and the kernel it started) and chromium.
    raise _Terminated(f"signal {signum}")


class BrowserTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        missing = []
        if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
            missing.append(f"chromium not found at {CHROMIUM} "
                           "(apt-get install -y --no-install-recommends chromium, or set CHROMIUM)")
        for mod, pkg in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("PIL", "pillow")):
            try:
                __import__(mod)
            except ImportError:
                missing.append(f"python module {mod} missing (pip install {pkg})")
        if missing:
            raise RuntimeError("browser test prerequisites missing:\n  " + "\n  ".join(missing))
        signal.signal(signal.SIGTERM, _on_sigterm)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="browser-test-")
        self.notebooks = os.path.join(self.tmp, "notebooks")
        os.makedirs(self.notebooks)
        os.makedirs(OUT_DIR, exist_ok=True)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- steps -------------------------------------------------------------------------------

    def execute_notebook(self):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Rust (diffexplainer)", "language": "rust"}
        nb.cells = [nbformat.v4.new_markdown_cell("# Browser test: two magenta squares below")]
        nb.cells += [nbformat.v4.new_code_cell(c) for c in CELLS]
        t = time.time()
        NotebookClient(nb, timeout=600, kernel_name=KERNEL).execute()
        print(f"\n  executed the notebook with nbclient in {time.time() - t:.1f} s", flush=True)
        outs = nb.cells[2].outputs
        self.assertEqual([o["output_type"] for o in outs], ["display_data", "execute_result"], outs)
        for o in outs:
            self.assertIn("image/png", o["data"])
        nbformat.write(nb, os.path.join(self.notebooks, "executed.ipynb"))
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
        nbformat.write(nb, os.path.join(self.notebooks, "cleared.ipynb"))

    def start_lab(self):
        cfg = os.path.join(self.tmp, "config")
        os.makedirs(os.path.join(cfg, "labconfig"))
        with open(os.path.join(cfg, "jupyter_server_config.json"), "w") as f:
            json.dump(SERVER_CONFIG, f)
        with open(os.path.join(cfg, "labconfig", "page_config.json"), "w") as f:
            json.dump(PAGE_CONFIG, f)
        # config, runtime and data dirs of its own: nothing from or into ~/.jupyter, ~/.local
        env = dict(os.environ, JUPYTER_CONFIG_DIR=cfg,
                   JUPYTER_RUNTIME_DIR=os.path.join(self.tmp, "runtime"),
                   JUPYTER_DATA_DIR=os.path.join(self.tmp, "data"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lab_log = open(os.path.join(OUT_DIR, "jupyterlab.log"), "w")
        cmd = [sys.executable, "-m", "jupyterlab", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--ServerApp.root_dir={self.notebooks}",
               f"--LabServerApp.workspaces_dir={os.path.join(self.tmp, 'workspaces')}",
               f"--LabServerApp.user_settings_dir={os.path.join(self.tmp, 'settings')}"]
        if os.getuid() == 0:
            cmd.append("--allow-root")
        self.lab = subprocess.Popen(cmd, env=env, stdout=self.lab_log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        deadline = time.time() + 90
        while True:
            if self.lab.poll() is not None:
                self.fail(f"jupyterlab exited ({self.lab.returncode}); see {self.lab_log.name}")
            try:
                if http("GET", self.base + "/api/status", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                self.fail(f"jupyterlab did not answer on {self.base} within 90 s; see {self.lab_log.name}")
            time.sleep(0.5)

    def stop_lab(self):
        if getattr(self, "lab", None) is None:
            return
        try:
            try:  # shuts down the kernels it started, then exits
                http("POST", self.base + "/api/shutdown", timeout=10)
            except Exception as e:
                print(f"  jupyterlab shutdown request failed: {e}", flush=True)
            try:
                self.lab.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.lab.terminate()
                try:
                    self.lab.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.lab.kill()
                    self.lab.wait(timeout=10)
        finally:
            self.lab_log.close()
            self.lab = None

    def stop_sessions(self):
        """Shuts down the kernels JupyterLab started for the open notebooks."""
        for s in http("GET", self.base + "/api/sessions")[1]:
            http("DELETE", self.base + f"/api/sessions/{s['id']}")

    def wait_for_kernel(self, page):
        """JupyterLab opened the notebook with our kernel (from the venv's kernelspec) and the
        kernel answered it (the server leaves `starting` on the kernel's first status message)."""
        deadline = time.time() + 90
        while True:
            sessions = http("GET", self.base + "/api/sessions")[1]
            states = [(s["kernel"]["name"], s["kernel"]["execution_state"]) for s in sessions]
            if any(k == KERNEL and st in ("idle", "busy") for k, st in states):
                return
            if time.time() > deadline:
                self.fail(f"JupyterLab's session for the notebook did not reach idle with kernel "
                          f"{KERNEL} in 90 s: (kernel, state) = {states}")
            page.wait_for_timeout(500)  # (keeps Playwright's event loop running)

    def open_notebook(self, browser, name, want_images, while_open=None):
        page = browser.new_page()
        # Chromium resolves no host but 127.0.0.1 (CHROMIUM_ARGS); log any other request. A
        # listener, not page.route: routed requests wait for Python to pump Playwright's event
        # loop, which stalls the page (its kernel websocket included) while the test waits.
        outside = []
        page.on("request", lambda r: None if r.url.startswith((self.base + "/", "data:", "blob:"))
                else outside.append(r.url))
        try:
            page.goto(f"{self.base}/lab/tree/{name}?reset", wait_until="domcontentloaded", timeout=120_000)
            # the notebook's source is rendered (both code cells)
            page.wait_for_function(
                "() => { const t = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .cm-content')]"
                ".map(e => e.textContent).join('\\n'); return t.includes('fn pattern') && t.includes('Image(b.clone())'); }",
                timeout=120_000)
            deadline = time.time() + 60
            while True:
                self.dismiss_dialogs(page)
                n = page.evaluate(
                    "() => [...document.querySelectorAll('.jp-Notebook .jp-RenderedImage img')]"
                    ".filter(i => i.complete && i.naturalWidth > 0).length")
                if n >= want_images and (want_images or time.time() > deadline - 55):
                    break  # (no images expected: give the page 5 s more to render anything)
                if time.time() > deadline:
                    break
                page.wait_for_timeout(250)
            page.wait_for_timeout(1000)  # let layout settle (scrollbars, toolbar)
            self.dismiss_dialogs(page)
            shot = os.path.join(OUT_DIR, name.replace(".ipynb", ".png"))
            page.screenshot(path=shot)
            print(f"  screenshot: {shot}", flush=True)
            boxes = page.evaluate(
                "() => [...document.querySelectorAll('.jp-Notebook .jp-RenderedImage img')].map(i => {"
                " const r = i.getBoundingClientRect();"
                " return {x0: r.left, y0: r.top, x1: r.right, y1: r.bottom, w: i.naturalWidth,"
                " h: i.naturalHeight, result: !!i.closest('.jp-OutputArea-executeResult')}; })")
            if while_open:
                while_open(page)
            if outside:
                print(f"  non-local requests (not resolved): {outside}", flush=True)
            return shot, boxes
        finally:
            page.close()

    @staticmethod
    def dismiss_dialogs(page):
        # e.g. a kernel selection dialog if the kernelspec were not found: choose no kernel
        for d in page.query_selector_all(".jp-Dialog"):
            print(f"  dismissing dialog: {d.inner_text()[:200]!r}", flush=True)
            page.keyboard.press("Escape")

    def check_square(self, region, horizontal, what):
        x0, y0, x1, y1 = region["box"]
        self.assertLessEqual(abs((x1 - x0) - SIZE), 1, f"{what}: region {region['box']} is not 64 px wide")
        self.assertLessEqual(abs((y1 - y0) - SIZE), 1, f"{what}: region {region['box']} is not 64 px high")
        self.assertAlmostEqual(region["magenta"], SIZE * (SIZE - 8), delta=SIZE * 2, msg=f"{what}: magenta count")
        self.assertAlmostEqual(region["green"], SIZE * 8, delta=SIZE, msg=f"{what}: green count")
        # where the green is: whole rows 24..31 (horizontal) or whole columns 40..47 (vertical)
        lo, hi = STRIPE if horizontal else VSTRIPE
        for (x, y), v in region["pixels"].items():
            pos = (y - y0) if horizontal else (x - x0)
            inside = lo <= pos < hi
            if (v == "g") != inside and abs(pos - lo) > 1 and abs(pos - hi) > 1:
                self.fail(f"{what}: {'green' if v == 'g' else 'magenta'} pixel at {(x - x0, y - y0)} "
                          f"(stripe should be {'rows' if horizontal else 'columns'} {lo}..{hi - 1})")

    # -- the test ----------------------------------------------------------------------------

    def test_notebook_renders_images_in_jupyterlab(self):
        from playwright.sync_api import sync_playwright
        self.execute_notebook()
        browser = None
        try:
            self.start_lab()
            t = time.time()
            with sync_playwright() as pw:
                profile = os.path.join(self.tmp, "chromium-profile")
                os.makedirs(profile)
                browser = pw.chromium.launch_persistent_context(
                    profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                    viewport={"width": 1280, "height": 900}, device_scale_factor=1,
                    timeout=60_000)
                try:
                    shot, boxes = self.open_notebook(browser, "executed.ipynb", want_images=2,
                                                     while_open=self.wait_for_kernel)
                    self.stop_sessions()
                    control, control_boxes = self.open_notebook(browser, "cleared.ipynb", want_images=0)
                    self.stop_sessions()
                finally:
                    browser.close()
            print(f"  browser part: {time.time() - t:.1f} s", flush=True)
        finally:
            self.stop_lab()

        # the DOM: two <img>, 64x64 natural size, the second one in the execute_result
        self.assertEqual(len(boxes), 2, boxes)
        self.assertEqual([(b["w"], b["h"], b["result"]) for b in boxes], [(64, 64, False), (64, 64, True)], boxes)

        # the pixels: exactly two magenta/green regions, the shapes and stripes drawn by the cell,
        # each inside the box of its <img>
        found = [r for r in regions(shot) if len(r["pixels"]) > 50]
        self.assertEqual(len(found), 2, f"{shot}: want 2 magenta squares, got regions "
                                        f"{[(r['box'], r['magenta'], r['green']) for r in found]}")
        found.sort(key=lambda r: r["box"][1])  # top to bottom, as the outputs are
        for region, box, horizontal, what in ((found[0], boxes[0], True, "display_data (show)"),
                                              (found[1], boxes[1], False, "execute_result (Image)")):
            self.check_square(region, horizontal, what)
            x0, y0, x1, y1 = region["box"]
            self.assertTrue(box["x0"] - 1 <= x0 and x1 <= box["x1"] + 1 and box["y0"] - 1 <= y0 and y1 <= box["y1"] + 1,
                            f"{what}: pixels at {region['box']} are not inside its <img> at {box}")

        # negative control: the same notebook without outputs has no image and no magenta pixel
        self.assertEqual(control_boxes, [])
        stray = regions(control)
        self.assertEqual(sum(r["magenta"] for r in stray), 0,
                         f"{control}: magenta pixels without outputs: {[r['box'] for r in stray][:5]}")


if __name__ == "__main__":
    unittest.main()
