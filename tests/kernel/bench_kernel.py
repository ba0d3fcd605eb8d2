"""Benchmark (not a test): kernel start to first result, first library cell, a trivial later cell.
Usage: JUPYTER_PATH=... python bench_kernel.py [kernel_name]"""
import sys
import time

from jupyter_client.manager import start_new_kernel

name = sys.argv[1] if len(sys.argv) > 1 else "diffexplainer-rust"


def timed(kc, code):
    t = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=900, output_hook=lambda m: None)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.perf_counter() - t


t0 = time.perf_counter()
km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
t_ready = time.perf_counter() - t0
t_first = timed(kc, "1 + 1")
t_start_to_first = time.perf_counter() - t0
t_lib = timed(kc, "let t = Tensor::randn(0f32, 1., (64, 64), &Device::Cpu).unwrap(); t.matmul(&t).unwrap().dims().to_vec()")
t_trivial = [timed(kc, f"{i} + 1") for i in range(3)]
kc.stop_channels()
km.shutdown_kernel()
print(f"kernel_info reply after start:   {t_ready:6.2f} s")
print(f"kernel start to first result:    {t_start_to_first:6.2f} s  (first cell `1 + 1`: {t_first:.2f} s)")
print(f"first cell using the library:    {t_lib:6.2f} s")
print("trivial later cells:             " + ", ".join(f"{t:.2f} s" for t in t_trivial))
