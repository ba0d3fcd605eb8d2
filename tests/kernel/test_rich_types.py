"""The library's own types render in the notebook: a plotters chart, the explainer's live view
updated in place during a real (tiny, embedded) optimization, the result and the textual
explanation as a cell's last expression. Runs through nbclient against the installed kernel."""
import base64
import os
import shutil
import tempfile
import unittest

import nbformat
from nbclient import NotebookClient

KERNEL = os.environ.get("DIFFEXPLAINER_KERNEL_NAME", "diffexplainer-rust")

CELLS = [
    # 0: a chart as the last expression: SVG, PNG fallback, text
    'LineChart::new("demo curve").labels("iteration", "value")\n'
    '    .series("value", (0..20).map(|i| (i as f64, (i as f64).sqrt())))\n'
    '    .marker(19.0, "best")',
    # 1: the explainer loop on the embedded tiny models with a live view (rendering every
    #    iteration: rate 1000/s), then the final state
    "use diffexplainer::explain::*;\n"
    "let pipeline = DiffusionPipeline::new(ModelBundle::tiny_random(0).unwrap(), PipelineOptions::default()).unwrap();\n"
    'let mut prompt = pipeline.new_prompt("A texture of {}", 2, &SoftPromptInit::Random { seed: 0 }).unwrap();\n'
    'let mut live = LiveView::with_rate("class 3", 1000.0);\n'
    "let config = OptimizeConfig { iterations: 4, ..OptimizeConfig::default() };\n"
    "let result = optimize(&pipeline, &mut prompt, &Objective::logit(3), Some(3), &config,\n"
    "    &CancelToken::new(), |m, images| live.observe(m, images)).unwrap();\n"
    "live.finish(&result);\n"
    'println!("renders {}", live.renders());',
    # 2: the result as the last expression
    "result",
    # 3: the textual explanation as the last expression
    # (a block: evcxr cannot keep a variable that borrows another one)
    "{ let b = pipeline.bundle();\n"
    "  nearest_tokens(prompt.template(), &result.best_vectors, &b.text_encoder, &b.tokenizer, 3).unwrap() }",
]


def png_size(b64):
    png = base64.b64decode(b64)
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), png[:8]
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


class RichTypesTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Rust (diffexplainer)", "language": "rust"}
        nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
        NotebookClient(nb, timeout=600, kernel_name=KERNEL).execute()
        cls.out = [c.outputs for c in nb.cells]

    def test_chart_renders_as_svg_with_png_fallback(self):
        (result,) = self.out[0]
        self.assertEqual(result["output_type"], "execute_result")
        data = result["data"]
        self.assertTrue(data["image/svg+xml"].lstrip().startswith("<svg"))
        self.assertIn("demo curve", data["image/svg+xml"])
        self.assertEqual(png_size(data["image/png"]), (640, 360))
        self.assertIn("20 point(s)", data["text/plain"])

    def test_live_view_updates_one_output_in_place(self):
        outputs = self.out[1]
        displays = [o for o in outputs if o["output_type"] == "display_data"]
        # nbclient applies update_display_data in place: one output, showing the final state.
        self.assertEqual(len(displays), 1, outputs)
        html = displays[0]["data"]["text/html"]
        self.assertIn("Finished", displays[0]["data"]["text/plain"])
        self.assertIn("iteration: 3", displays[0]["data"]["text/plain"])
        self.assertIn("data:image/png;base64,", html)
        self.assertIn("data:image/svg+xml;base64,", html)
        stream = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
        # Four iterations at an unbounded rate plus the final render: five renders, all of
        # which reached the same output.
        self.assertIn("renders 5", stream)

    def test_result_renders_images_and_curves(self):
        (result,) = self.out[2]
        self.assertEqual(result["output_type"], "execute_result")
        data = result["data"]
        self.assertIn("Finished after 4 iteration(s)", data["text/plain"])
        self.assertIn("objective per iteration", data["text/html"])
        self.assertIn("target probability per iteration", data["text/html"])
        w, h = png_size(data["image/png"])
        self.assertGreater(w, 0)
        self.assertGreater(h, 0)

    def test_explanation_renders_as_table(self):
        (result,) = self.out[3]
        data = result["data"]
        self.assertIn("<th>nearest tokens (cosine)</th>", data["text/html"])
        self.assertIn("prompt: A texture of", data["text/plain"])


class CrossCellGraphTests(unittest.TestCase):
    """Tensors made in different cells share one graph correctly. evcxr links a copy of candle
    into every cell; with stock candle each copy numbered tensors from 1, so ids collided across
    cells and backprop mixed up nodes (vendor/README.md)."""

    def test_tensor_ids_are_unique_across_cells_and_backprop_spans_cells(self):
        cells = [
            'format!("{:?}", Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().id())',
            'format!("{:?}", Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap().id())',
            # a variable and many weights in one cell ...
            "let v = candle_core::Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();\n"
            "let ws: Vec<Tensor> = (0..50).map(|_| Tensor::new(&[2f32, 1., 0.5], &Device::Cpu).unwrap()).collect();",
            # ... the graph and its backward in the next
            "let mut y = v.as_tensor().clone();\n"
            "for w in &ws { y = (y * w).unwrap().affine(0.5, 0.0).unwrap(); }\n"
            "let g = y.sum_all().unwrap().backward().unwrap();\n"
            'format!("{:?}", g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap())',
        ]
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
        NotebookClient(nb, timeout=600, kernel_name=KERNEL).execute()
        ids = [nb.cells[i].outputs[0]["data"]["text/plain"] for i in (0, 1)]
        self.assertNotEqual(ids[0], ids[1], "tensor ids restart in every cell")
        grad = [float(x) for x in nb.cells[3].outputs[0]["data"]["text/plain"].strip('"[]').split(",")]
        # d/dv of sum(v * prod(w) * 0.5^50) = (2, 1, 0.5)^50 * 0.5^50.
        expected = [1.0, 0.5**50, 0.25**50]
        for got, want in zip(grad, expected):
            self.assertAlmostEqual(got / want, 1.0, places=4)


NOTEBOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "notebooks")


class ShippedNotebookTests(unittest.TestCase):
    """Every notebook in notebooks/ runs top to bottom in the kernel without an error, except the
    cells tagged `needs-real-weights` (06-real-models: SD 1.5, ResNet-50 from the Hub), which must
    stop with the library's clear "weights not available" error, never a panic. The kernel runs
    with empty Hugging Face and torch caches, as on a fresh machine."""

    TAG = "needs-real-weights"

    def test_notebooks_execute(self):
        names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
        self.assertTrue(names, "no notebooks found")
        self.assertIn("06-real-models.ipynb", names)
        empty = tempfile.mkdtemp(prefix="dx-empty-caches-")
        saved = {k: os.environ.get(k) for k in ("HF_HOME", "TORCH_HOME")}
        os.environ["HF_HOME"] = os.path.join(empty, "hf")
        os.environ["TORCH_HOME"] = os.path.join(empty, "torch")
        try:
            for name in names:
                with self.subTest(notebook=name):
                    self.check_notebook(name)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(empty, ignore_errors=True)

    def check_notebook(self, name):
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        # Executed under the test kernel; the file keeps its own kernelspec.
        NotebookClient(nb, timeout=600, kernel_name=KERNEL, allow_errors=True).execute()
        code = [c for c in nb.cells if c.cell_type == "code"]
        tagged = [c for c in code if self.TAG in c.metadata.get("tags", [])]
        for i, c in enumerate(code):
            errors = [o for o in c.outputs if o["output_type"] == "error"]
            text = "\n".join(
                [o.get("evalue", "") + "\n" + "\n".join(o.get("traceback", [])) for o in errors]
                + [o.get("text", "") for o in c.outputs if o["output_type"] == "stream"]
            )
            self.assertNotIn("panicked", text, f"{name} cell {i}")
            if c in tagged:
                self.assertTrue(errors, f"{name} cell {i} needs real weights but did not fail")
                self.assertIn("weights not available", text, f"{name} cell {i}: {text[:2000]}")
            else:
                self.assertFalse(errors, f"{name} cell {i}: {text[:2000]}")
        if not tagged:
            outputs = [o for c in code for o in c.outputs]
            images = [o for o in outputs if "image/png" in o.get("data", {})]
            self.assertTrue(images, f"{name}: no image output")


if __name__ == "__main__":
    unittest.main()
