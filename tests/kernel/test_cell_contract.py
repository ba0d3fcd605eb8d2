"""Issue 10: a failed cell fails (error status, stop_on_error), silent requests publish nothing,
is_complete follows Rust's lexer, shell requests are answered while a cell runs, messages are in
the cell's terms, and history is kept. Each class runs in a fresh kernel."""
import time
import unittest

from kernel_client import iopub_of, of_type, run, shell_reply, start, stop, stream_text


class KernelTestCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.km, cls.kc = start()

    @classmethod
    def tearDownClass(cls):
        stop(cls.km, cls.kc)

    def assert_error(self, reply, msgs, ename=None, n_errors=1):
        """The reply has status error with ename/evalue/traceback, and `n_errors` iopub `error`
        messages (None: at least one), the first saying the same; returns the reply content."""
        content = reply["content"]
        self.assertEqual(content["status"], "error", content)
        for key in ("ename", "evalue", "traceback"):
            self.assertIn(key, content)
        self.assertTrue(content["traceback"], content)
        if ename is not None:
            self.assertEqual(content["ename"], ename, content)
        errors = of_type(msgs, "error")
        if n_errors is None:
            self.assertTrue(errors, msgs)
        else:
            self.assertEqual(len(errors), n_errors, msgs)
        self.assertEqual(errors[0]["content"]["ename"], content["ename"])
        self.assertEqual(errors[0]["content"]["evalue"], content["evalue"])
        self.assertFalse(of_type(msgs, "execute_result"), msgs)
        return content


class ErrorStatusTests(KernelTestCase):
    """Item 1: an `Err` at `?` or as the final value fails the cell."""

    def test_question_mark_error_is_an_error(self):
        reply, msgs = run(self.kc, 'let x: i32 = "a".parse()?;\nx')
        content = self.assert_error(reply, msgs, "ParseIntError")
        self.assertEqual(content["evalue"], "invalid digit found in string")
        self.assertIn("ParseIntError: invalid digit found in string", content["traceback"])
        # Reported as the cell's error, not (also) as text on stderr.
        self.assertNotIn("invalid digit", stream_text(msgs, "stderr"))
        # The session goes on.
        reply, msgs = run(self.kc, "40 + 2")
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(of_type(msgs, "execute_result")[0]["content"]["data"]["text/plain"], "42")

    def test_final_err_value_is_an_error(self):
        reply, msgs = run(self.kc, '"a".parse::<i32>()')
        content = self.assert_error(reply, msgs, "ParseIntError")
        self.assertEqual(content["evalue"], "invalid digit found in string")
        # An Ok final value is still a result.
        reply, msgs = run(self.kc, '"5".parse::<i32>()')
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(of_type(msgs, "execute_result")[0]["content"]["data"]["text/plain"], "Ok(5)")

    def test_candle_error_carries_its_context(self):
        code = (
            "let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;\n"
            "let b = Tensor::zeros((4, 5), DType::F32, &Device::Cpu)?;\n"
            'a.matmul(&b).map_err(|e| e.context("multiplying the weights"))?;'
        )
        reply, msgs = run(self.kc, code, timeout=300)
        content = self.assert_error(reply, msgs, "Error")
        self.assertIn("multiplying the weights", content["evalue"])
        self.assertIn("shape mismatch", content["evalue"])

    def test_anyhow_error_carries_its_context_chain(self):
        code = (
            'let dir = std::env::temp_dir().join(format!("issue10-empty-{}", std::process::id()));\n'
            "std::fs::create_dir_all(&dir).unwrap();\n"
            "let record = diffexplainer::explain::record::RunRecord::open(&dir)?;"
        )
        reply, msgs = run(self.kc, code, timeout=300)
        content = self.assert_error(reply, msgs, "Error")
        # anyhow's `{:#}`: the context, then its cause, on one line.
        self.assertIn("cannot read the run's config", content["evalue"])
        self.assertIn("No such file or directory", content["evalue"])


class StopOnErrorTests(KernelTestCase):
    """Item 2: requests queued behind a failed cell are aborted when stop_on_error is true."""

    def queue_after_failure(self, failing, stop_on_error=True):
        ids = [self.kc.execute(failing, stop_on_error=stop_on_error)]
        ids.append(self.kc.execute('println!("second ran");'))
        ids.append(self.kc.execute("6 * 7"))
        replies = [shell_reply(self.kc, i, timeout=300) for i in ids]
        msgs = [iopub_of(self.kc, i, timeout=300) for i in ids]
        return replies, msgs

    def check_aborted(self, failing):
        replies, msgs = self.queue_after_failure(failing)
        self.assertEqual(replies[0]["content"]["status"], "error", replies[0]["content"])
        for reply, m in zip(replies[1:], msgs[1:]):
            self.assertEqual(reply["content"]["status"], "aborted", reply["content"])
            # Not run: nothing published but the busy/idle status.
            self.assertEqual(m, [], m)
        # A request sent after the failure runs.
        reply, msgs = run(self.kc, 'println!("after");')
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(stream_text(msgs), "after\n")

    def test_question_mark_error_aborts_the_queue(self):
        self.check_aborted('let x: i32 = "a".parse()?;')

    def test_panic_aborts_the_queue(self):
        self.check_aborted('panic!("boom");')

    def test_compile_error_aborts_the_queue(self):
        self.check_aborted("let x: u32 = \"not a number\";")

    def test_no_abort_without_stop_on_error(self):
        replies, msgs = self.queue_after_failure('panic!("boom");', stop_on_error=False)
        self.assertEqual(replies[0]["content"]["status"], "error")
        self.assertEqual([r["content"]["status"] for r in replies[1:]], ["ok", "ok"])
        self.assertEqual(stream_text(msgs[1]), "second ran\n")


class SilentTests(KernelTestCase):
    """Item 3: silent requests publish nothing and keep execution_count."""

    def test_silent_publishes_nothing_and_keeps_the_count(self):
        reply, _ = run(self.kc, "1 + 1")
        count = reply["content"]["execution_count"]
        code = 'println!("hidden"); eprintln!("hidden too"); show(&Display::new().text("d")); 42'
        reply, msgs = run(self.kc, code, silent=True)
        self.assertEqual(reply["content"]["status"], "ok")
        self.assertEqual(reply["content"]["execution_count"], count)
        self.assertEqual(msgs, [], msgs)
        # A failing silent request publishes no error either (the reply carries it).
        reply, msgs = run(self.kc, 'panic!("quiet");', silent=True)
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual(msgs, [], msgs)
        reply, msgs = run(self.kc, "2 + 2")
        self.assertEqual(reply["content"]["execution_count"], count + 1)
        self.assertEqual(of_type(msgs, "execute_input")[0]["content"]["execution_count"], count + 1)


class IsCompleteTests(KernelTestCase):
    """Item 5: is_complete follows rustc's lexer."""

    def status(self, code):
        msg_id = self.kc.is_complete(code)
        return shell_reply(self.kc, msg_id, timeout=30)["content"]["status"]

    def test_raw_strings_and_stray_closers(self):
        self.assertEqual(self.status(r'let p = r"C:\dir\";'), "complete")
        self.assertEqual(self.status(r'let s = r#"say "hi""#;'), "complete")
        self.assertEqual(self.status(r'let j = r#"{"a": "}"}"#;'), "complete")
        self.assertEqual(self.status("}"), "invalid")
        self.assertEqual(self.status("let v = vec![1, (2, 3]"), "invalid")
        self.assertEqual(self.status('let s = r#"open'), "incomplete")
        self.assertEqual(self.status("fn f() {\n    let x = 1;"), "incomplete")


class AnsweredWhileRunningTests(KernelTestCase):
    """Item 6: kernel_info, comm_info, is_complete and history are answered during a cell."""

    def test_shell_requests_are_answered_while_a_cell_sleeps(self):
        run(self.kc, "let before = 1;")
        exec_id = self.kc.execute(
            'std::thread::sleep(std::time::Duration::from_secs(8)); println!("woke");'
        )
        # Wait until the cell is running (its execute_input is published when it starts).
        while True:
            m = self.kc.get_iopub_msg(timeout=120)
            if m["parent_header"].get("msg_id") == exec_id and m["msg_type"] == "execute_input":
                break
        t0 = time.monotonic()
        requests = {
            self.kc.kernel_info(): "kernel_info_reply",
            self.kc.comm_info(): "comm_info_reply",
            self.kc.is_complete("fn f() {"): "is_complete_reply",
            self.kc.history(hist_access_type="tail", n=1): "history_reply",
        }
        seen = []
        while len(seen) < len(requests):
            reply = self.kc.get_shell_msg(timeout=60)
            parent = reply["parent_header"].get("msg_id")
            # All four come before the running cell's reply.
            self.assertNotEqual(parent, exec_id, f"the cell ended first; answered: {seen}")
            if parent in requests:
                self.assertEqual(reply["msg_type"], requests[parent])
                seen.append(reply["msg_type"])
        answered_after = time.monotonic() - t0
        reply = shell_reply(self.kc, exec_id, timeout=120)
        cell_done_after = time.monotonic() - t0
        self.assertEqual(reply["content"]["status"], "ok")
        # The cell sleeps 8 s: the answers came well before its end.
        self.assertLess(answered_after, cell_done_after / 2, (answered_after, cell_done_after))


class MessagesInCellTermsTests(KernelTestCase):
    """Item 7: one accurate message after a kill; errors and panics in the cell's terms."""

    def test_compile_error_in_generated_code_is_reported_in_the_cell(self):
        reply, msgs = run(self.kc, "let b = 1;\nlet a = std::", timeout=300)
        # One error message per syntax error, each at its line and column of the cell.
        content = self.assert_error(reply, msgs, "CompilationError", n_errors=None)
        self.assertIn("line 2, column 14", content["evalue"])
        for error in of_type(msgs, "error"):
            text = error["content"]["evalue"] + "\n" + "\n".join(error["content"]["traceback"])
            self.assertIn("line 2", text)
            self.assertNotIn("evcxr", text)

    def test_panic_location_is_a_cell_line(self):
        reply, msgs = run(self.kc, "let v: Vec<i32> = Vec::new();\nlet i = 3;\nlet x: i32 = *v.get(i).unwrap();")
        content = self.assert_error(reply, msgs, "panic")
        self.assertIn("on a `None` value", content["evalue"])
        self.assertIn("thread panicked at cell line 3:", content["traceback"])
        self.assertNotIn("src/lib.rs", "\n".join(content["traceback"]) + stream_text(msgs, "stderr"))

    def test_second_interrupt_gives_one_accurate_message(self):
        run(self.kc, "let kept = 5;")
        exec_id = self.kc.execute("loop { std::thread::sleep(std::time::Duration::from_millis(50)); }")
        while True:
            m = self.kc.get_iopub_msg(timeout=120)
            if m["parent_header"].get("msg_id") == exec_id and m["msg_type"] == "execute_input":
                break
        time.sleep(1.0)
        self.km.interrupt_kernel()
        time.sleep(1.0)
        self.km.interrupt_kernel()
        reply = shell_reply(self.kc, exec_id, timeout=120)
        msgs = iopub_of(self.kc, exec_id, timeout=120)
        content = self.assert_error(reply, msgs, "ProcessTerminated")
        self.assertIn("variables were lost", content["evalue"])
        everything = content["evalue"] + stream_text(msgs, "stderr") + stream_text(msgs)
        self.assertNotIn("variables are kept", everything)
        # The restarted process serves the next cell; the old variable is gone.
        reply, msgs = run(self.kc, "1 + 2")
        self.assertEqual(reply["content"]["status"], "ok")
        reply, msgs = run(self.kc, "kept")
        self.assertEqual(reply["content"]["status"], "error")


class HistoryTests(KernelTestCase):
    """Item 8: this session's inputs, with tail, range and search."""

    def history(self, **kwargs):
        msg_id = self.kc.history(raw=True, output=False, **kwargs)
        return shell_reply(self.kc, msg_id, timeout=30)["content"]["history"]

    def test_tail_range_and_search(self):
        codes = ["let h1 = 1;", "let h2 = 2;", "let h1 = 1;"]
        counts = [run(self.kc, c)[0]["content"]["execution_count"] for c in codes]
        tail = self.history(hist_access_type="tail", n=3)
        self.assertEqual([h[2] for h in tail], codes)
        self.assertEqual([h[1] for h in tail], counts)
        session = tail[0][0]
        ranged = self.history(hist_access_type="range", session=session, start=counts[1], stop=counts[1] + 1)
        self.assertEqual(ranged, [[session, counts[1], "let h2 = 2;"]])
        self.assertEqual(len(self.history(hist_access_type="search", pattern="let h1*")), 2)
        self.assertEqual(len(self.history(hist_access_type="search", pattern="let h1*", unique=True)), 1)
        self.assertEqual(len(self.history(hist_access_type="search", pattern="let h*", n=2)), 2)
        # Silent requests are not history.
        run(self.kc, "let silent_one = 1;", silent=True)
        self.assertEqual(self.history(hist_access_type="search", pattern="*silent_one*"), [])


if __name__ == "__main__":
    unittest.main()
