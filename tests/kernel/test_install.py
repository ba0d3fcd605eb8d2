"""The installed kernel is self-contained: run_kernel_tests.sh installs it from a temporary copy
of the checkout (KERNEL_INSTALL_SOURCE) and deletes that copy; the kernel must then start from
its kernelspec directory alone and preload the library from the snapshot installed there."""
import json
import os
import subprocess
import tempfile
import tomllib
import unittest
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel

import kernel_client

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")


class InstalledKernelTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        cls.dir = Path(spec.resource_dir).resolve()
        cls.argv = spec.argv
        cls.workspace = cls.dir / "workspace"

    def test_source_copy_is_gone(self):
        source = os.environ.get("KERNEL_INSTALL_SOURCE")
        self.assertTrue(source, "run_kernel_tests.sh sets KERNEL_INSTALL_SOURCE")
        self.assertFalse(Path(source).exists(), f"{source} should have been deleted")

    def test_argv_names_the_copies_in_the_kernel_dir(self):
        exe = Path(self.argv[0])
        self.assertEqual(exe, self.dir / "diffexplainer-kernel")
        self.assertTrue(os.access(exe, os.X_OK), exe)
        i = self.argv.index("--workspace")
        self.assertEqual(Path(self.argv[i + 1]), self.workspace)
        text = (self.dir / "kernel.json").read_text()
        # Every path the kernelspec names lies in the kernel's own directory (which may itself
        # sit below the checkout, as the test venv in target/ does), never elsewhere in it.
        for arg in json.loads(text)["argv"]:
            if arg.startswith("/"):
                self.assertTrue(Path(arg).is_relative_to(self.dir), arg)
        self.assertEqual(json.loads(text)["argv"][-2:], ["--connection-file", "{connection_file}"])

    def test_snapshot_holds_the_library_workspace(self):
        for f in ["Cargo.toml", "Cargo.lock", "lib/Cargo.toml", "lib/src/lib.rs",
                  "vendor/candle-core/Cargo.toml"]:
            self.assertTrue((self.workspace / f).is_file(), self.workspace / f)
        self.assertFalse((self.workspace / "lib" / "tests").exists())
        manifest = tomllib.loads((self.workspace / "Cargo.toml").read_text())
        self.assertEqual(manifest["workspace"]["members"], ["lib"])
        self.assertEqual(list(manifest["patch"]["crates-io"]), ["candle-core"])
        # No leftovers of the staging and swap.
        self.assertEqual(sorted(p.name for p in self.dir.iterdir() if p.name.startswith(".")), [])

    def test_library_cell_runs_from_the_snapshot(self):
        # The kernelspec's --workspace wins over the environment: a bogus library path here
        # would fail the preload if the kernel fell back to it.
        env = dict(os.environ, DIFFEXPLAINER_LIB_PATH="/nonexistent/diffexplainer/lib")
        km, kc = start_new_kernel(kernel_name=KERNEL, startup_timeout=60, env=env)
        try:
            reply, msgs = kernel_client.run(
                kc,
                'println!("{}", std::env::var("DIFFEXPLAINER_LIB_PATH").unwrap());\n'
                "let spec = diffexplainer::world::spec::WorldSpec::default_world();\n"
                'let _ = spec.values("shape").unwrap();\n'
                'println!("{}", Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap()'
                ".sum_all().unwrap().to_scalar::<f32>().unwrap());",
                timeout=600,
            )
            self.assertEqual(reply["content"]["status"], "ok", msgs)
            lines = kernel_client.stream_text(msgs).splitlines()
            self.assertEqual(Path(lines[0]), self.workspace / "lib")
            self.assertEqual(lines[1], "6")
        finally:
            kernel_client.stop(km, kc)


class InstallStepTests(unittest.TestCase):
    """`install` itself, with the installed executable into temporary prefixes (milliseconds)."""

    @classmethod
    def setUpClass(cls):
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        cls.exe = spec.argv[0]
        # The installed snapshot has what a checkout needs for `install`: install from it.
        cls.source = Path(spec.resource_dir) / "workspace"

    def install(self, prefix, *args):
        return subprocess.run(
            [self.exe, "install", "--prefix", str(prefix), *args],
            capture_output=True, text=True, timeout=120,
        )

    def test_reinstall_replaces_the_snapshot_and_keeps_mtimes(self):
        with tempfile.TemporaryDirectory() as prefix:
            r = self.install(prefix, "--name", "t", "--source", str(self.source))
            self.assertEqual(r.returncode, 0, r.stderr)
            kdir = Path(prefix) / "share" / "jupyter" / "kernels" / "t"
            stray = kdir / "workspace" / "lib" / "src" / "stray.rs"
            stray.write_text("// not in the source")
            r = self.install(prefix, "--name", "t", "--source", str(self.source))
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertFalse(stray.exists())
            self.assertEqual([p.name for p in kdir.iterdir() if p.name.startswith(".")], [])
            for f in ["Cargo.lock", "lib/src/lib.rs", "vendor/candle-core/src/lib.rs"]:
                self.assertEqual((kdir / "workspace" / f).stat().st_mtime_ns,
                                 (self.source / f).stat().st_mtime_ns, f)

    def test_refusals_name_the_problem_and_write_nothing(self):
        with tempfile.TemporaryDirectory() as prefix:
            kernels = Path(prefix) / "share" / "jupyter" / "kernels"
            r = self.install(prefix, "--name", "rust", "--source", str(self.source))
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("refusing to install as `rust`", r.stderr)
            foreign = kernels / "other"
            foreign.mkdir(parents=True)
            (foreign / "kernel.json").write_text('{"argv": ["python3"]}')
            r = self.install(prefix, "--name", "other", "--source", str(self.source))
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(str(foreign / "kernel.json"), r.stderr)
            self.assertEqual([p.name for p in foreign.iterdir()], ["kernel.json"])
            missing = Path(prefix) / "no-checkout"
            r = self.install(prefix, "--name", "t", "--source", str(missing))
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(str(missing), r.stderr)
            self.assertFalse((kernels / "t").exists())


if __name__ == "__main__":
    unittest.main()
