"""Issue 10, item 4: every cell gets exactly its own output, in order; partial lines are
delivered; invalid bytes are shown as U+FFFD; display frames are recognised after a partial
line; text that looks like a marker is text. One fresh kernel for the class."""
import unittest

from kernel_client import of_type, run, start, stop, stream_text


class OutputFramingTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.km, cls.kc = start()

    @classmethod
    def tearDownClass(cls):
        stop(cls.km, cls.kc)

    def assert_session_in_step(self):
        """A later cell gets exactly its own output and result."""
        reply, msgs = run(self.kc, 'println!("mine"); 6 * 7')
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        self.assertEqual(stream_text(msgs), "mine\n")
        self.assertEqual(of_type(msgs, "execute_result")[0]["content"]["data"]["text/plain"], "42")

    def test_flushed_partial_line_is_delivered_and_the_cell_ends(self):
        code = (
            "use std::io::Write;\n"
            'print!("loss: ");\n'
            "std::io::stdout().flush().unwrap();\n"
            "std::thread::sleep(std::time::Duration::from_secs(3));\n"
            'println!("0.5");'
        )
        msg_id = self.kc.execute(code)
        reply = None
        first_text = None
        while True:
            m = self.kc.get_iopub_msg(timeout=120)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "stream" and first_text is None:
                first_text = m["content"]["text"]
                # The partial line arrives while the cell still sleeps: its reply is not there.
                self.assertEqual(first_text, "loss: ")
                self.assertFalse(self.kc.shell_channel.msg_ready(), "partial line held until the end")
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=60)
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(first_text, "loss: ")
        self.assert_session_in_step()

    def test_unflushed_print_belongs_to_its_cell(self):
        reply, msgs = run(self.kc, 'print!("tail without newline");')
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_text(msgs), "tail without newline")
        reply, msgs = run(self.kc, 'println!("next cell");')
        self.assertEqual(stream_text(msgs), "next cell\n")

    def test_display_after_partial_line_is_an_image(self):
        code = (
            'print!("x");\n'
            "show(&display::image(&Tensor::ones((3, 4, 4), DType::F32, &Device::Cpu).unwrap()).unwrap());\n"
            'println!("y");'
        )
        reply, msgs = run(self.kc, code, timeout=300)
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        kinds = [m["msg_type"] for m in msgs if m["msg_type"] != "execute_input"]
        self.assertEqual(kinds, ["stream", "display_data", "stream"], kinds)
        self.assertEqual(stream_text(msgs), "xy\n")
        self.assertIn("image/png", of_type(msgs, "display_data")[0]["content"]["data"])
        self.assertNotIn("iVBOR", stream_text(msgs))

    def test_result_after_partial_line(self):
        reply, msgs = run(self.kc, 'print!("partial"); Display::new().text("shown")')
        self.assertEqual(stream_text(msgs), "partial")
        self.assertEqual(of_type(msgs, "execute_result")[0]["content"]["data"]["text/plain"], "shown")

    def test_invalid_utf8_on_stdout(self):
        code = 'use std::io::Write;\nstd::io::stdout().write_all(b"bad \\xff byte\\n").unwrap();'
        reply, msgs = run(self.kc, code)
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        self.assertEqual(stream_text(msgs), "bad \ufffd byte\n")
        self.assert_session_in_step()

    def test_invalid_utf8_on_stderr(self):
        code = 'use std::io::Write;\nstd::io::stderr().write_all(b"err \\xfe\\n").unwrap();'
        reply, msgs = run(self.kc, code)
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        self.assertEqual(stream_text(msgs, "stderr"), "err \ufffd\n")
        reply, msgs = run(self.kc, 'eprintln!("stderr still works");')
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        self.assertEqual(stream_text(msgs, "stderr"), "stderr still works\n")

    def test_marker_lookalikes_are_text(self):
        code = (
            'println!("EVCXR_EXECUTION_COMPLETE");\n'
            'println!("DIFFEXPLAINER_BEGIN_DISPLAY {{}}");\n'
            'println!("EVCXR_PANIC_NOTIFICATION");\n'
            "1"
        )
        reply, msgs = run(self.kc, code)
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        self.assertEqual(
            stream_text(msgs),
            "EVCXR_EXECUTION_COMPLETE\nDIFFEXPLAINER_BEGIN_DISPLAY {}\nEVCXR_PANIC_NOTIFICATION\n",
        )
        self.assertEqual(of_type(msgs, "execute_result")[0]["content"]["data"]["text/plain"], "1")
        self.assert_session_in_step()


if __name__ == "__main__":
    unittest.main()
