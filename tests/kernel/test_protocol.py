"""Protocol behaviours beyond jupyter_kernel_test: signatures, several outputs per cell, live
updates at a bounded rate, cooperative interrupt keeping state, panics, compile errors."""
import os
import queue
import time
import unittest

import zmq
from jupyter_client.manager import start_new_kernel
from jupyter_client.session import Session

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")


def run(kc, code, timeout=120):
    """Executes code; returns (reply, [iopub messages of this request, excluding status])."""
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    msgs = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
        if m["msg_type"] != "status":
            msgs.append(m)
    return reply, msgs


class ProtocolTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.km, cls.kc = start_new_kernel(kernel_name=KERNEL, startup_timeout=60)
        reply, _ = run(cls.kc, "1", timeout=600)
        assert reply["content"]["status"] == "ok", reply

    @classmethod
    def tearDownClass(cls):
        cls.kc.stop_channels()
        cls.km.shutdown_kernel()

    def test_bad_signature_is_rejected(self):
        info = self.km.get_connection_info(session=False)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        try:
            forged = Session(key=b"not-the-key")
            forged.send(sock, "kernel_info_request", {})
            self.assertEqual(sock.poll(1500), 0, "kernel answered a message with a bad signature")
            good = Session(key=info["key"], signature_scheme=info["signature_scheme"])
            good.send(sock, "kernel_info_request", {})
            self.assertNotEqual(sock.poll(5000), 0, "kernel did not answer a signed message")
            _, reply = good.recv(sock)
            self.assertEqual(reply["msg_type"], "kernel_info_reply")
        finally:
            sock.close(linger=0)

    def test_several_outputs_in_one_cell(self):
        code = (
            'println!("before");\n'
            'show(&display::table(&["a", "b"], &[vec!["1".into(), "2".into()]]));\n'
            "let img = Tensor::ones((3, 4, 4), DType::F32, &Device::Cpu).unwrap();\n"
            "show(&display::image_grid(&[img.clone(), img.zeros_like().unwrap()], 2, 1).unwrap());\n"
            'println!("after");\n'
            "Image(img.clone())  // evcxr falls back to Debug when the final expression moves a variable"
        )
        reply, msgs = run(self.kc, code)
        self.assertEqual(reply["content"]["status"], "ok", msgs)
        kinds = [m["msg_type"] for m in msgs]
        self.assertEqual(kinds.count("display_data"), 2, kinds)
        self.assertIn("text/html", msgs[kinds.index("display_data")]["content"]["data"])
        pngs = [m for m in msgs if "image/png" in m["content"].get("data", {})]
        self.assertEqual(len(pngs), 2)  # the grid and the final Image
        self.assertEqual(kinds[-1], "execute_result")
        text = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
        self.assertIn("before", text)
        self.assertIn("after", text)

    def test_progress_updates_in_place_and_interrupt_keeps_state(self):
        reply, _ = run(self.kc, "let kept = 41;")
        self.assertEqual(reply["content"]["status"], "ok")
        code = (
            'let mut progress = Progress::new("optimizing");\n'
            "let mut best = 0u64;\n"
            "for i in 0..100_000u64 {\n"
            "    if interrupted() { break; }\n"
            "    std::thread::sleep(std::time::Duration::from_millis(10));\n"
            "    best = i;\n"
            '    progress.update(&[("iteration", i.to_string()), ("loss", format!("{:.4}", 1.0 / (i as f64 + 1.0)))]);\n'
            "}\n"
            'progress.finish("stopped");\n'
            "best"
        )
        msg_id = self.kc.execute(code)
        time.sleep(3.0)
        t_interrupt = time.time()
        self.km.interrupt_kernel()
        reply = self.kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=60)
        stop_latency = time.time() - t_interrupt
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        msgs = []
        while True:
            try:
                m = self.kc.get_iopub_msg(timeout=5)
            except queue.Empty:
                break
            if m["parent_header"].get("msg_id") == msg_id:
                msgs.append(m)
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    break
        displays = [m for m in msgs if m["msg_type"] == "display_data"]
        updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
        self.assertEqual(len(displays), 1)
        display_id = displays[0]["content"]["transient"]["display_id"]
        self.assertTrue(updates)
        self.assertTrue(all(u["content"]["transient"]["display_id"] == display_id for u in updates))
        # ~3 s at <= 4 updates/s (+ the final one)
        self.assertLessEqual(len(updates), 4 * 4 + 2, len(updates))
        self.assertIn("stopped", updates[-1]["content"]["data"]["text/plain"])
        results = [m for m in msgs if m["msg_type"] == "execute_result"]
        self.assertEqual(len(results), 1)
        self.assertGreater(int(results[0]["content"]["data"]["text/plain"]), 10)
        self.assertLess(stop_latency, 5)
        # The session survived.
        reply, msgs = run(self.kc, "kept + 1")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual([m for m in msgs if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"], "42")

    def test_panic_is_an_error_and_kernel_keeps_serving(self):
        run(self.kc, "let survivor = 7;")
        reply, msgs = run(self.kc, 'let v: Vec<i32> = vec![]; if v.is_empty() { panic!("boom {}", 1); }')
        self.assertEqual(reply["content"]["status"], "error")
        errors = [m for m in msgs if m["msg_type"] == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["content"]["ename"], "panic")
        self.assertIn("boom 1", errors[0]["content"]["evalue"])
        reply, msgs = run(self.kc, "survivor * 6")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual([m for m in msgs if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"], "42")

    def test_compile_error_carries_rustc_diagnostic(self):
        reply, msgs = run(self.kc, 'let x: u32 = "a";')
        self.assertEqual(reply["content"]["status"], "error")
        errors = [m for m in msgs if m["msg_type"] == "error"]
        self.assertTrue(errors)
        self.assertIn("mismatched types", errors[0]["content"]["evalue"])
        self.assertTrue(any("u32" in line for line in errors[0]["content"]["traceback"]))


if __name__ == "__main__":
    unittest.main()
