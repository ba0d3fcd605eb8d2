"""Jupyter's own kernel conformance suite (jupyter_kernel_test) against the installed kernel."""
import os
import unittest

import jupyter_kernel_test as jkt

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")


class DiffexplainerKernelTests(jkt.KernelTests):
    kernel_name = KERNEL
    language_name = "rust"
    file_extension = ".rs"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The first request waits for evcxr to start and the library to preload.
        cls.kc.execute_interactive("1", timeout=600, output_hook=lambda msg: None)

    code_hello_world = 'println!("hello, world");'
    code_stderr = 'eprintln!("oops");'
    code_generate_error = "let x: u32 = \"not a number\";"
    code_execute_result = [
        {"code": "6 * 7", "result": "42"},
        {"code": '"abc".len()', "result": "3"},
        {"code": "Display::new().html(\"<b>x</b>\").text(\"x\")", "mime": "text/html", "result": "<b>x</b>"},
    ]
    code_display_data = [
        {"code": 'show(&Display::new().text("a").html("<i>a</i>"));', "mime": "text/html"},
        {
            "code": "show(&display::image(&Tensor::ones((3, 8, 8), DType::F32, &Device::Cpu).unwrap()).unwrap());",
            "mime": "image/png",
        },
    ]
    complete_code_samples = ["let x = 1;", "fn f() {}", 'let s = "{";', r'let p = r"C:\dir\";']
    incomplete_code_samples = ["fn f() {", "let v = vec![1,"]
    invalid_code_samples = ["}", "(]"]
    # History: this session's inputs (tail, range, search with unique and n).
    supported_history_operations = ("tail", "range", "search")
    code_history_pattern = '"abc"*'
    completion_samples = [{"text": "std::collections::HashM"}]
    code_inspect_sample = "std::collections::HashMap"


if __name__ == "__main__":
    unittest.main()
