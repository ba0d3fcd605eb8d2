"""Executes a notebook headless with nbclient and checks its outputs' MIME types and contents.
Writes the executed notebook to $EXECUTED_NOTEBOOK (for the browser test) when set."""
import base64
import os
import unittest

import nbformat
from nbclient import NotebookClient

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")

CELLS = [
    # 0: the library is in scope without any :dep line
    "let x = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();\nx.sum_all().unwrap().to_scalar::<f32>().unwrap()",
    # 1: an image as the last expression (red square)
    "let red = Tensor::cat(&[Tensor::ones((1, 64, 64), DType::F32, &Device::Cpu).unwrap(),\n"
    "    Tensor::zeros((2, 64, 64), DType::F32, &Device::Cpu).unwrap()], 0).unwrap();\nImage(red.clone())",
    # 2: several outputs: a grid, a table, text
    "show(&display::image_grid(&[red.clone(), red.ones_like().unwrap(), red.zeros_like().unwrap()], 3, 2).unwrap());\n"
    'show(&display::table(&["iteration", "loss"], &[vec!["0".into(), "1.5".into()], vec!["1".into(), "0.7".into()]]));\n'
    'println!("done");',
    # 3: live progress
    'let mut p = Progress::new("demo");\nfor i in 0..5 { p.update(&[("iteration", i.to_string())]); }\np.finish("done");',
]


class NotebookTests(unittest.TestCase):
    def test_execute_notebook(self):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Rust (diffexplainer)", "language": "rust"}
        nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
        NotebookClient(nb, timeout=600, kernel_name=KERNEL).execute()
        out = [c.outputs for c in nb.cells]

        self.assertEqual(out[0][0]["output_type"], "execute_result")
        self.assertEqual(out[0][0]["data"]["text/plain"], "15.0")

        png = base64.b64decode(out[1][0]["data"]["image/png"])
        self.assertTrue(png.startswith(b"\x89PNG\r\n\x1a\n"))
        self.assertEqual(int.from_bytes(png[16:20], "big"), 64)  # IHDR width

        types = [o["output_type"] for o in out[2]]
        self.assertEqual(types, ["display_data", "display_data", "stream"], types)
        self.assertIn("image/png", out[2][0]["data"])
        self.assertIn("<th>iteration</th>", out[2][1]["data"]["text/html"])
        self.assertEqual(out[2][2]["text"], "done\n")

        # nbclient applies update_display_data in place: one output showing the final state.
        self.assertEqual(len(out[3]), 1, out[3])
        self.assertIn("done", out[3][0]["data"]["text/plain"])

        path = os.environ.get("EXECUTED_NOTEBOOK")
        if path:
            nbformat.write(nb, path)


if __name__ == "__main__":
    unittest.main()
