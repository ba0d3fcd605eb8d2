#!/usr/bin/env python3
"""Writes the parity cases (reference outputs and input gradients) that the Rust code is tested
against, following docs/parity-format.md, plus a few weight-loading fixtures.

    python3 scripts/make_parity_cases.py [--out tests/parity/cases] [--fixtures tests/fixtures]
                                         [--only NAME ...] [--list]

Needs torch, torchvision, transformers, safetensors, numpy (CPU is enough). Every case seeds
torch's RNG from its own name, so reruns reproduce the same files. References are computed in
float64 (the f32 weights and inputs are converted up) and stored as f32; as a fairness check each
case is also run in float32 PyTorch, which must meet the case's tolerance against the f64 result.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import transformers
from safetensors.torch import load_file, save_file
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import VGG, make_layers
from torchvision.models.vision_transformer import VisionTransformer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FORWARD_REL = 1e-4
DEFAULT_GRAD_REL = 1e-3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _base_version(v: str) -> str:
    return v.split("+")[0]


TORCH_V = _base_version(torch.__version__)
TV_V = _base_version(torchvision.__version__)
TF_V = _base_version(transformers.__version__)
VERSIONS = f"torch {TORCH_V}, torchvision {TV_V}, transformers {TF_V}; float64 reference on CPU, stored as f32"


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def seed_of(name: str) -> int:
    """A stable per-case seed (independent of registry order and Python's hash salt)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def seed_case(name: str) -> None:
    torch.manual_seed(seed_of(name))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(torch.float32)
        out[k] = v.contiguous().clone()
    save_file(out, str(path), metadata={"format": "pt"})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def rel_err(ours: torch.Tensor, want: torch.Tensor) -> float:
    ours = ours.detach().double()
    want = want.detach().double()
    return (ours - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


def distinct_values(shape, lo: float = -3.0, hi: float = 3.0) -> torch.Tensor:
    """A random permutation of evenly spaced values: no ties, so max-pool argmaxes are unique."""
    n = math.prod(shape)
    perm = torch.randperm(n).to(torch.float64)
    return (lo + (hi - lo) * perm / (n - 1)).to(torch.float32).reshape(shape)


def randomize_(model: nn.Module, gain: float = 1.0, emb_std: float = 1.0) -> None:
    """Random values for every parameter and norm buffer, so no default init (ones, zeros, zero
    biases, unit running stats) hides a bug."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(1234)
            elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                mod.weight.copy_(1.0 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.normal_(0.0, 0.2)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.normal_(0.0, gain / math.sqrt(fan_in))
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.2)
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, emb_std)
            elif isinstance(mod, nn.MultiheadAttention):
                d = mod.embed_dim
                mod.in_proj_weight.normal_(0.0, 1.0 / math.sqrt(d))
                mod.in_proj_bias.normal_(0.0, 0.2)


# Forward: (inputs converted to `dtype`, dtype) -> outputs by name.
Forward = Callable[[dict, torch.dtype], dict]


@dataclass
class Case:
    kind: str
    reference: str
    inputs: dict  # name -> f32 / i64 tensor (as stored)
    outputs: list
    grad_inputs: list
    forward: Forward
    config: dict | None = None  # written as config.json (ignored if config_file is set)
    config_file: Path | None = None  # a config.json to copy verbatim (transformers)
    weights: dict | None = None  # name -> tensor, stored as weights.safetensors
    options: dict = field(default_factory=dict)
    tolerance: tuple = (DEFAULT_FORWARD_REL, DEFAULT_GRAD_REL)


def run_reference(case: Case, dtype: torch.dtype, cotangents: dict | None):
    """Runs the forward in `dtype`; if cotangents are given (else drawn from the RNG, f32),
    backpropagates sum_o sum(out_o * cot_o) to the grad inputs. Returns outputs, grads, cots."""
    inp = {}
    for k, v in case.inputs.items():
        t = v.detach().clone()
        if t.is_floating_point():
            t = t.to(dtype)
        if k in case.grad_inputs:
            t.requires_grad_(True)
        inp[k] = t
    out = case.forward(inp, dtype)
    missing = [o for o in case.outputs if o not in out]
    assert not missing, f"forward produced no {missing}"
    if cotangents is None:
        cotangents = {o: torch.randn(out[o].shape, dtype=torch.float32) for o in case.outputs}
    grads = {}
    if case.grad_inputs:
        loss = sum((out[o] * cotangents[o].to(dtype)).sum() for o in case.outputs)
        loss.backward()
        for g in case.grad_inputs:
            assert inp[g].grad is not None, f"no gradient reaches input {g}"
            grads[g] = inp[g].grad.detach()
    return {o: out[o].detach() for o in case.outputs}, grads, cotangents


def write_case(name: str, case: Case, out_root: Path) -> None:
    ref_out, ref_grads, cots = run_reference(case, torch.float64, None)
    expected = dict(ref_out)
    for g, t in ref_grads.items():
        expected[f"grad.{g}"] = t

    for k, t in expected.items():
        assert torch.isfinite(t).all(), f"{name}: {k} is not finite"
    for g in case.grad_inputs:
        assert expected[f"grad.{g}"].abs().max() > 0, f"{name}: grad.{g} is all zeros"

    # Fairness: f32 PyTorch must meet the bars the Rust code is held to.
    f32_out, f32_grads, _ = run_reference(case, torch.float32, cots)
    fwd_bar, grad_bar = case.tolerance
    report = []
    for o in case.outputs:
        r = rel_err(f32_out[o], ref_out[o])
        report.append(f"{o}={r:.1e}")
        assert r < fwd_bar, f"{name}: f32 torch misses the forward bar on {o}: {r:.3e}"
    for g in case.grad_inputs:
        r = rel_err(f32_grads[g], ref_grads[g])
        report.append(f"grad.{g}={r:.1e}")
        assert r < grad_bar, f"{name}: f32 torch misses the gradient bar on grad.{g}: {r:.3e}"

    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    spec = {
        "kind": case.kind,
        "reference": f"{case.reference} ({VERSIONS})",
        "options": case.options,
        "outputs": case.outputs,
        "grad_inputs": case.grad_inputs,
        "tolerance": {"forward_rel": case.tolerance[0], "grad_rel": case.tolerance[1]},
    }
    write_json(d / "case.json", spec)
    if case.config_file is not None:
        shutil.copyfile(case.config_file, d / "config.json")
    else:
        write_json(d / "config.json", case.config if case.config is not None else {})
    if case.weights is not None:
        save_tensors(d / "weights.safetensors", case.weights)
    save_tensors(d / "inputs.safetensors", case.inputs)
    save_tensors(d / "cotangents.safetensors", cots)
    save_tensors(d / "expected.safetensors", expected)
    print(f"  {name:<34} f32-torch rel: {' '.join(report)}")


CASES: dict[str, Callable[[], Case]] = {}
FIXTURES: dict[str, Callable[[Path], None]] = {}


def case(name: str):
    def register(fn):
        assert name not in CASES
        CASES[name] = fn
        return fn

    return register


def fixture(name: str):
    def register(fn):
        assert name not in FIXTURES
        FIXTURES[name] = fn
        return fn

    return register


def functional(kind: str, ref: str, fn: Callable, x: torch.Tensor, options=None, config=None) -> Case:
    """A single-input op `y = fn(x)` (fn receives the x already in the run's dtype)."""
    return Case(
        kind=kind,
        reference=f"torch {ref}",
        inputs={"x": x},
        outputs=["y"],
        grad_inputs=["x"],
        forward=lambda inp, dtype: {"y": fn(inp["x"])},
        options=options or {},
        config=config or {},
    )


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------


@case("op_layer_norm")
def _():
    x = torch.randn(2, 5, 16) * 2.0 + 0.5
    w = 1.0 + 0.5 * torch.randn(16)
    b = 0.5 * torch.randn(16)
    eps = 1e-5
    return Case(
        kind="op.layer_norm",
        reference="torch.nn.functional.layer_norm",
        inputs={"x": x},
        outputs=["y"],
        grad_inputs=["x"],
        forward=lambda inp, dt: {"y": F.layer_norm(inp["x"], (16,), w.to(dt), b.to(dt), eps)},
        config={"normalized_shape": 16, "eps": eps},
        weights={"weight": w, "bias": b},
    )


@case("op_group_norm")
def _():
    x = torch.randn(2, 8, 6, 6) * 1.5 - 0.3
    w = 1.0 + 0.5 * torch.randn(8)
    b = 0.5 * torch.randn(8)
    eps = 1e-6
    return Case(
        kind="op.group_norm",
        reference="torch.nn.functional.group_norm",
        inputs={"x": x},
        outputs=["y"],
        grad_inputs=["x"],
        forward=lambda inp, dt: {"y": F.group_norm(inp["x"], 4, w.to(dt), b.to(dt), eps)},
        config={"num_groups": 4, "num_channels": 8, "eps": eps},
        weights={"weight": w, "bias": b},
    )


@case("op_softmax")
def _():
    return functional("op.softmax", "torch.softmax(dim=-1)", lambda x: torch.softmax(x, -1), torch.randn(3, 7, 11) * 2.5)


@case("op_log_softmax")
def _():
    return functional(
        "op.log_softmax", "torch.log_softmax(dim=-1)", lambda x: torch.log_softmax(x, -1), torch.randn(3, 7, 11) * 2.5
    )


def attention_case(q_shape, k_shape, causal: bool, mask_shape=None, scale=None) -> Case:
    b, h, sq, d = q_shape
    sk = k_shape[2]
    inputs = {
        "q": torch.randn(q_shape),
        "k": torch.randn(k_shape),
        "v": torch.randn(k_shape),
    }
    if mask_shape is not None:
        mask = torch.randn(mask_shape)
        blocked = torch.rand(mask_shape) < 0.3
        blocked[..., 0] = False  # every query keeps at least one key unblocked
        mask[blocked] = -1e4
        inputs["mask"] = mask

    def forward(inp, dt):
        mask = inp.get("mask")
        is_causal = causal
        if causal and mask is not None:
            # SDPA refuses attn_mask with is_causal: fold the (top-left) causal mask in.
            tri = torch.ones(sq, sk, dtype=torch.bool).tril()
            mask = mask + torch.zeros(sq, sk, dtype=dt).masked_fill(~tri, float("-inf"))
            is_causal = False
        y = F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], attn_mask=mask, is_causal=is_causal, scale=scale)
        return {"y": y}

    options = {"causal": causal}
    if scale is not None:
        options["scale"] = scale
    return Case(
        kind="op.attention",
        reference="torch.nn.functional.scaled_dot_product_attention"
        + (" (is_causal folded into attn_mask as -inf above the diagonal)" if causal and mask_shape else ""),
        inputs=inputs,
        outputs=["y"],
        grad_inputs=["q", "k", "v"],
        forward=forward,
        options=options,
        config={},
    )


@case("op_attention_causal")
def _():
    return attention_case((2, 3, 7, 8), (2, 3, 7, 8), causal=True)


@case("op_attention_mask")
def _():
    return attention_case((2, 3, 7, 8), (2, 3, 7, 8), causal=False, mask_shape=(2, 1, 7, 7))


@case("op_attention_cross")
def _():
    return attention_case((2, 3, 5, 8), (2, 3, 9, 8), causal=False)


@case("op_attention_scale")
def _():
    # Explicit scale and a mask broadcast over batch and heads.
    return attention_case((2, 2, 5, 8), (2, 2, 9, 8), causal=False, mask_shape=(1, 1, 5, 9), scale=0.3)


@case("op_attention_causal_mask")
def _():
    return attention_case((1, 2, 6, 8), (1, 2, 6, 8), causal=True, mask_shape=(1, 2, 6, 6))


def activation_input():
    return torch.rand(4, 50) * 10.0 - 5.0


@case("op_gelu_erf")
def _():
    return functional("op.gelu_erf", "torch.nn.functional.gelu", F.gelu, activation_input())


@case("op_gelu_tanh")
def _():
    return functional(
        "op.gelu_tanh",
        "torch.nn.functional.gelu(approximate='tanh')",
        lambda x: F.gelu(x, approximate="tanh"),
        activation_input(),
    )


@case("op_quick_gelu")
def _():
    return functional(
        "op.quick_gelu", "x * torch.sigmoid(1.702 * x)", lambda x: x * torch.sigmoid(1.702 * x), activation_input()
    )


@case("op_silu")
def _():
    return functional("op.silu", "torch.nn.functional.silu", F.silu, activation_input())


def max_pool_case(shape, kernel, stride, padding):
    return functional(
        "op.max_pool2d",
        f"torch.nn.functional.max_pool2d(kernel_size={kernel}, stride={stride}, padding={padding})",
        lambda x: F.max_pool2d(x, kernel, stride, padding),
        distinct_values(shape),
        options={"kernel": kernel, "stride": stride, "padding": padding},
    )


@case("op_max_pool2d_resnet_stem")
def _():
    return max_pool_case((2, 3, 13, 13), 3, 2, 1)


@case("op_max_pool2d_k2")
def _():
    return max_pool_case((1, 2, 8, 8), 2, 2, 0)


def max_pool_ties_case(name, shape, kernel, stride, padding):
    """Integer values from {0, 1, 2}: most windows hold tied maxima, where PyTorch gives the
    whole gradient to the first maximum in row-major window order."""
    x = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed_of(name))).float()
    return functional(
        "op.max_pool2d",
        f"torch.nn.functional.max_pool2d(kernel_size={kernel}, stride={stride}, padding={padding}) "
        "on tied maxima",
        lambda x: F.max_pool2d(x, kernel, stride, padding),
        x,
        options={"kernel": kernel, "stride": stride, "padding": padding},
    )


@case("op_max_pool2d_ties_k2")
def _():
    return max_pool_ties_case("op_max_pool2d_ties_k2", (1, 2, 6, 6), 2, 2, 0)


@case("op_max_pool2d_ties_stem")
def _():
    return max_pool_ties_case("op_max_pool2d_ties_stem", (1, 2, 9, 9), 3, 2, 1)


@case("op_avg_pool2d")
def _():
    return functional(
        "op.avg_pool2d",
        "torch.nn.functional.avg_pool2d(kernel_size=3, stride=2, padding=1, count_include_pad=True)",
        lambda x: F.avg_pool2d(x, 3, 2, 1),
        torch.randn(1, 2, 9, 9),
        options={"kernel": 3, "stride": 2, "padding": 1},
    )


def adaptive_case(shape, size):
    return functional(
        "op.adaptive_avg_pool2d",
        f"torch.nn.functional.adaptive_avg_pool2d(output_size={tuple(size)})",
        lambda x: F.adaptive_avg_pool2d(x, tuple(size)),
        torch.randn(shape),
        options={"output_size": list(size)},
    )


@case("op_adaptive_avg_pool2d_7x7")
def _():
    return adaptive_case((1, 2, 8, 8), (7, 7))


@case("op_adaptive_avg_pool2d_1x1")
def _():
    return adaptive_case((1, 2, 10, 10), (1, 1))


@case("op_upsample_nearest2x")
def _():
    return functional(
        "op.upsample_nearest2x",
        "torch.nn.functional.interpolate(scale_factor=2, mode='nearest')",
        lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
        torch.randn(1, 2, 5, 4),
    )


def resize_case(shape, size, antialias):
    return functional(
        "op.resize_bilinear",
        f"torch.nn.functional.interpolate(size={tuple(size)}, mode='bilinear', align_corners=False, antialias={antialias})",
        lambda x: F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias),
        torch.rand(shape),
        options={"size": list(size), "antialias": antialias},
    )


@case("op_resize_bilinear_down_aa")
def _():
    return resize_case((1, 3, 37, 37), (16, 16), True)


@case("op_resize_bilinear_down")
def _():
    return resize_case((1, 3, 37, 37), (16, 16), False)


@case("op_resize_bilinear_up")
def _():
    return resize_case((1, 2, 6, 5), (13, 11), False)


@case("op_resize_bicubic")
def _():
    # transformers' position-embedding interpolation (CLIP vision, CLIPSeg): up, and down.
    return functional(
        "op.resize_bicubic",
        "torch.nn.functional.interpolate(mode='bicubic', align_corners=False)",
        lambda x: torch.cat(
            [
                F.interpolate(x, size=(9, 7), mode="bicubic", align_corners=False).flatten(),
                F.interpolate(x, size=(3, 4), mode="bicubic", align_corners=False).flatten(),
            ]
        ),
        torch.randn((1, 2, 5, 6)),
        options={"sizes": [[9, 7], [3, 4]]},
    )


# ---------------------------------------------------------------------------------------------
# CLIP text encoder (transformers)
# ---------------------------------------------------------------------------------------------


def clip_text_case(hidden_act: str, config_ids: dict, input_ids: torch.Tensor) -> Case:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=hidden_act,
        **config_ids,
    )
    model = CLIPTextModel(cfg).eval()
    randomize_(model, gain=1.0, emb_std=1.0)

    tmp = Path(tempfile.mkdtemp(prefix="clip_text_"))
    model.save_pretrained(tmp)
    saved = load_file(str(tmp / "model.safetensors"))
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; real checkpoints
    # (SD's text_encoder/model.safetensors) carry it, and transformers loads both.
    weights = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in saved.items()}
    own = {f"text_model.{k}": v for k, v in model.state_dict().items()}
    assert weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own)

    with torch.no_grad():
        inputs_embeds = model.embeddings.token_embedding(input_ids).clone()
    models = {torch.float32: model, torch.float64: copy.deepcopy(model).to(torch.float64)}

    def forward(inp, dt):
        m = models[dt]
        emb = inp["inputs_embeds"]
        hook = m.embeddings.token_embedding.register_forward_hook(lambda mod, args, out: emb)
        try:
            out = m(input_ids=inp["input_ids"], output_hidden_states=True)
        finally:
            hook.remove()
        return {
            "last_hidden_state": out.last_hidden_state,
            "penultimate_hidden_state": out.hidden_states[-2],
            "pooler_output": out.pooler_output,
        }

    # The hook must feed exactly what the model's own embedding lookup gives.
    with torch.no_grad():
        plain = models[torch.float64](input_ids=input_ids).last_hidden_state
        hooked = forward({"input_ids": input_ids, "inputs_embeds": inputs_embeds.double()}, torch.float64)
        assert torch.equal(plain, hooked["last_hidden_state"])

    c = Case(
        kind="clip_text",
        reference=f"transformers {TF_V} CLIPTextModel (attn_implementation={model.config._attn_implementation}, "
        "no attention_mask, weights under real checkpoints' `text_model.` prefix)",
        inputs={"input_ids": input_ids, "inputs_embeds": inputs_embeds},
        outputs=["last_hidden_state", "penultimate_hidden_state", "pooler_output"],
        grad_inputs=["inputs_embeds"],
        forward=forward,
        config_file=tmp / "config.json",
        weights=weights,
    )
    return c


def clip_ids(rows, fill):
    ids = torch.full((len(rows), 16), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return ids


@case("clip_text_quickgelu")
def _():
    # SD 1.x style: the config keeps the legacy eos_token_id=2 (as SD's text_encoder/config.json
    # does), so transformers pools at argmax(input_ids); the tokenizer's EOS is the largest id (98,
    # like 49407) and pads with EOS. Token 2 appears in the text to catch a "first id == 2" pooler.
    bos, eos = 97, 98
    rows = [
        [bos, 12, 2, 45, 7, 60, eos],
        [bos, 3, 88, 14, 2, 51, 9, 33, 70, 25, 41, 66, eos],
    ]
    ids = clip_ids(rows, fill=eos)
    return clip_text_case("quick_gelu", {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}, ids)


@case("clip_text_gelu")
def _():
    # New-style config: pooled at the first position equal to eos_token_id (97), padding with 0
    # after it (OpenCLIP pads with "!" = 0). The text holds 98 > eos, so argmax pooling would
    # pick the wrong token.
    bos, eos = 96, 97
    rows = [
        [bos, 98, 17, 30, 5, eos],
        [bos, 40, 11, 98, 73, 2, 19, 58, 84, 6, eos],
    ]
    ids = clip_ids(rows, fill=0)
    return clip_text_case("gelu", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 0}, ids)


# ---------------------------------------------------------------------------------------------
# CLIP vision tower (transformers)
# ---------------------------------------------------------------------------------------------


def clip_vision_case(hidden_act: str, size: tuple, hidden_states: list, interpolate: bool) -> Case:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
        hidden_act=hidden_act,
    )
    model = CLIPVisionModelWithProjection(cfg).eval()
    randomize_(model, gain=1.0, emb_std=1.0)
    with torch.no_grad():
        model.vision_model.embeddings.class_embedding.normal_(0.0, 1.0)

    tmp = Path(tempfile.mkdtemp(prefix="clip_vision_"))
    model.save_pretrained(tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    own = model.state_dict()
    assert weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own)
    assert any(k.startswith("vision_model.") for k in weights)

    models = {torch.float32: model, torch.float64: copy.deepcopy(model).to(torch.float64)}

    def forward(inp, dt):
        out = models[dt](
            pixel_values=inp["pixel_values"],
            interpolate_pos_encoding=interpolate,
            output_hidden_states=True,
        )
        res = {
            "last_hidden_state": out.last_hidden_state,
            "pooler_output": models[dt].vision_model(
                pixel_values=inp["pixel_values"], interpolate_pos_encoding=interpolate
            ).pooler_output,
            "image_embeds": out.image_embeds,
        }
        for i in hidden_states:
            res[f"hidden_states.{i}"] = out.hidden_states[i]
        return res

    pixel_values = torch.randn(2, 3, *size)
    return Case(
        kind="clip_vision",
        reference=f"transformers {TF_V} CLIPVisionModelWithProjection "
        f"(attn_implementation={model.config._attn_implementation}, interpolate_pos_encoding={interpolate})",
        inputs={"pixel_values": pixel_values},
        outputs=["last_hidden_state", "pooler_output", "image_embeds"]
        + [f"hidden_states.{i}" for i in hidden_states],
        grad_inputs=["pixel_values"],
        forward=forward,
        config_file=tmp / "config.json",
        weights=weights,
        options={"hidden_states": hidden_states, "interpolate_pos_encoding": interpolate},
    )


@case("clip_vision_quickgelu")
def _():
    # The model's own 16x16 input (4x4 patches of 4 px): no interpolation.
    return clip_vision_case("quick_gelu", (16, 16), [0, 2], interpolate=False)


@case("clip_vision_gelu_interpolated")
def _():
    # A 24x20 input: a 6x5 patch grid, so the 4x4 position grid is resized bicubically.
    return clip_vision_case("gelu", (24, 20), [1, 3], interpolate=True)


# ---------------------------------------------------------------------------------------------
# CLIPSeg (transformers)
# ---------------------------------------------------------------------------------------------


def clipseg_case(complex_head: bool, size: int, input_ids: torch.Tensor) -> Case:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    cfg = CLIPSegConfig(
        text_config=dict(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        projection_dim=24,
        extract_layers=[0, 1, 2],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=20,
        use_complex_transposed_convolution=complex_head,
    )
    model = CLIPSegForImageSegmentation(cfg).eval()
    randomize_(model, gain=1.0, emb_std=1.0)
    with torch.no_grad():
        model.clip.vision_model.embeddings.class_embedding.normal_(0.0, 1.0)
        for mod in model.modules():
            if isinstance(mod, nn.ConvTranspose2d):
                mod.weight.normal_(0.0, 1.0 / math.sqrt(mod.weight.shape[0]))
                mod.bias.normal_(0.0, 0.2)

    tmp = Path(tempfile.mkdtemp(prefix="clipseg_"))
    model.save_pretrained(tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    own = model.state_dict()
    assert weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own)

    models = {torch.float32: model, torch.float64: copy.deepcopy(model).to(torch.float64)}

    def forward(inp, dt):
        # transformers runs the vision tower under no_grad; the same steps with grad enabled.
        m = models[dt]
        vision = m.clip.vision_model(
            pixel_values=inp["pixel_values"], interpolate_pos_encoding=True, output_hidden_states=True
        )
        activations = [vision.hidden_states[i + 1] for i in m.extract_layers]
        with torch.no_grad():
            cond = m.clip.get_text_features(inp["input_ids"]).pooler_output
        logits = m.decoder(activations, cond).logits
        return {"logits": logits, "conditional_embeddings": cond}

    pixel_values = torch.randn(2, 3, size, size)
    with torch.no_grad():
        whole = models[torch.float64](input_ids=input_ids, pixel_values=pixel_values.double()).logits
        steps = forward({"input_ids": input_ids, "pixel_values": pixel_values.double()}, torch.float64)
        assert torch.equal(whole, steps["logits"])

    return Case(
        kind="clipseg",
        reference=f"transformers {TF_V} CLIPSegForImageSegmentation "
        f"(use_complex_transposed_convolution={complex_head}, interpolate_pos_encoding=True; "
        "the vision tower and decoder run with grad enabled for the pixel gradient)",
        inputs={"pixel_values": pixel_values, "input_ids": input_ids},
        outputs=["logits", "conditional_embeddings"],
        grad_inputs=["pixel_values"],
        forward=forward,
        config_file=tmp / "config.json",
        weights=weights,
    )


@case("clipseg_refined")
def _():
    # The refined model's head; a 48 px input on a 32 px model (4x4 -> 6x6 patch grid), as the
    # real model runs 352 px on its 224 px positions. Legacy eos_token_id 2: pooled at the argmax.
    ids = clip_ids([[97, 12, 2, 45, 98], [97, 3, 88, 14, 51, 9, 98]], fill=98)
    return clipseg_case(True, 48, ids)


@case("clipseg_simple")
def _():
    # The plain ConvTranspose2d head at the model's own size.
    ids = clip_ids([[97, 40, 98], [97, 5, 6, 7, 98]], fill=98)
    return clipseg_case(False, 32, ids)


# ---------------------------------------------------------------------------------------------
# torchvision classifiers
# ---------------------------------------------------------------------------------------------


class TinyResNet(ResNet):
    """torchvision's ResNet with its hard-coded widths (64, 64/128/256/512) made configurable:
    same module tree, same _make_layer, same parameter and buffer names."""

    def __init__(self, block, layers, widths, stem_width, num_classes):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = stem_width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)


def build_resnet(cfg: dict) -> TinyResNet:
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg["block"]]
    model = TinyResNet(block, cfg["layers"], cfg["widths"], cfg["stem_width"], cfg["num_classes"])
    randomize_(model, gain=math.sqrt(2.0))
    return model.eval()


RESNET18_TINY = {"block": "basic", "layers": [2, 2, 2, 2], "widths": [8, 16, 32, 64], "stem_width": 8, "num_classes": 10}
RESNET50_TINY = {"block": "bottleneck", "layers": [1, 2, 1, 1], "widths": [4, 8, 16, 32], "stem_width": 8, "num_classes": 12}


def check_resnet_names(model: nn.Module, cfg: dict) -> None:
    """Same state-dict names as the stock torchvision ResNet with the same blocks and layers."""
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg["block"]]
    stock = ResNet(block, cfg["layers"], num_classes=cfg["num_classes"])
    assert list(stock.state_dict().keys()) == list(model.state_dict().keys())


def preprocess(image, size, antialias, dt):
    x = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(IMAGENET_MEAN, dtype=dt).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dt).view(1, 3, 1, 1)
    return (x - mean) / std


def hooked_forward(models: dict, taps: dict, post: dict | None = None, pre=None, input_name="pixel_values"):
    """Forward through `models[dtype]`, returning `logits` plus the outputs of the named
    submodules (taps: output name -> dotted module path), each passed through post[name]."""
    post = post or {}

    def forward(inp, dt):
        m = models[dt]
        caught = {}
        hooks = []
        for out_name, path in taps.items():
            mod = m.get_submodule(path)
            hooks.append(mod.register_forward_hook(lambda mod, args, out, n=out_name: caught.__setitem__(n, out)))
        try:
            x = inp[input_name]
            if pre is not None:
                x = pre(x, dt)
            logits = m(x)
        finally:
            for h in hooks:
                h.remove()
        res = {"logits": logits}
        for n, t in caught.items():
            res[n] = post[n](t) if n in post else t
        return res

    return forward


def resnet_case(cfg: dict, input_name: str, make_input: Callable[[], torch.Tensor], options: dict) -> Case:
    model = build_resnet(cfg)
    check_resnet_names(model, cfg)
    weights = model.state_dict()
    models = {torch.float32: model, torch.float64: copy.deepcopy(model).to(torch.float64)}
    taps = {"features": "avgpool", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}
    pre = None
    if "preprocess" in options:
        p = options["preprocess"]
        pre = lambda x, dt: preprocess(x, p["resize"], p["antialias"], dt)  # noqa: E731
    return Case(
        kind="resnet",
        reference=f"torchvision {TV_V} torchvision.models.resnet.ResNet (widths overridden)"
        + (", after F.interpolate(bilinear, align_corners=False) + ImageNet mean/std" if pre else ""),
        inputs={input_name: make_input()},
        outputs=["logits", "features", "layer1", "layer2", "layer3", "layer4"],
        grad_inputs=[input_name],
        forward=hooked_forward(models, taps, post={"features": lambda t: torch.flatten(t, 1)}, pre=pre, input_name=input_name),
        config=cfg,
        weights=weights,
        options=options,
    )


@case("resnet18_tiny")
def _():
    return resnet_case(RESNET18_TINY, "pixel_values", lambda: torch.randn(2, 3, 40, 40), {})


@case("resnet50_tiny_preprocess")
def _():
    options = {"preprocess": {"resize": 36, "antialias": True}}
    return resnet_case(RESNET50_TINY, "image", lambda: torch.rand(1, 3, 50, 50), options)


VGG16_TINY_CFG = [4, 4, "M", 8, 8, "M", 16, 16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M"]


def build_vgg(cfg: list, hidden: int, num_classes: int) -> VGG:
    model = VGG(make_layers(cfg, batch_norm=False), num_classes=num_classes, init_weights=False)
    last = [v for v in cfg if v != "M"][-1]
    model.classifier = nn.Sequential(
        nn.Linear(last * 7 * 7, hidden),
        nn.ReLU(True),
        nn.Dropout(p=0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(p=0.5),
        nn.Linear(hidden, num_classes),
    )
    randomize_(model, gain=math.sqrt(2.0))
    return model.eval()


@case("vgg16_tiny")
def _():
    cfg = {"cfg": VGG16_TINY_CFG, "batch_norm": False, "hidden": 24, "num_classes": 10}
    model = build_vgg(cfg["cfg"], cfg["hidden"], cfg["num_classes"])
    stock = torchvision.models.vgg16(num_classes=10)
    assert list(stock.state_dict().keys()) == list(model.state_dict().keys())
    models = {torch.float32: model, torch.float64: copy.deepcopy(model).to(torch.float64)}
    return Case(
        kind="vgg",
        reference=f"torchvision {TV_V} torchvision.models.vgg.VGG(make_layers(cfg)) (widths overridden)",
        inputs={"pixel_values": torch.randn(1, 3, 64, 64)},
        outputs=["logits", "conv_features", "penultimate"],
        grad_inputs=["pixel_values"],
        forward=hooked_forward(models, {"conv_features": "features", "penultimate": "classifier.4"}),
        config=cfg,
        weights=model.state_dict(),
    )


@case("vit_tiny")
def _():
    cfg = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 24, "num_classes": 7}
    model = VisionTransformer(**cfg)
    randomize_(model, gain=1.0)
    with torch.no_grad():
        model.class_token.normal_(0.0, 1.0)
        model.encoder.pos_embedding.normal_(0.0, 0.5)
    model.eval()
    models = {torch.float32: model, torch.float64: copy.deepcopy(model).to(torch.float64)}
    taps = {"cls_feature": "encoder", **{f"block_{i}": f"encoder.layers.encoder_layer_{i}" for i in range(cfg["num_layers"])}}
    return Case(
        kind="vit",
        reference=f"torchvision {TV_V} torchvision.models.vision_transformer.VisionTransformer",
        inputs={"pixel_values": torch.randn(2, 3, 32, 32)},
        outputs=["logits", "cls_feature"] + [f"block_{i}" for i in range(cfg["num_layers"])],
        grad_inputs=["pixel_values"],
        forward=hooked_forward(models, taps, post={"cls_feature": lambda t: t[:, 0]}),
        config=cfg,
        weights=model.state_dict(),
    )


# ---------------------------------------------------------------------------------------------
# Weight-loading fixtures (tests/fixtures)
# ---------------------------------------------------------------------------------------------


class InputNormalize(nn.Module):
    """robustness.helpers.InputNormalize (buffers new_mean/new_std, [3,1,1])."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean)[..., None, None])
        self.register_buffer("new_std", torch.tensor(std)[..., None, None])

    def forward(self, x):
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class Attacker(nn.Module):
    """robustness.attacker.Attacker's stored state: note its normalizer is named `normalize`."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.model = model


class AttackerModel(nn.Module):
    """robustness.attacker.AttackerModel: normalizer, model, attacker (sharing the model)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.normalizer = InputNormalize(mean, std)
        self.model = model
        self.attacker = Attacker(model, mean, std)

    def forward(self, x):
        return self.model(self.normalizer(x))


class DataParallelLike(nn.Module):
    """Stands in for nn.DataParallel: only adds the `module.` prefix to the state dict."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@fixture("robust_resnet_tiny")
def _(out: Path):
    """The layout of the Salient-ImageNet robust ResNet-50 (`imagenet_l2_3_0.pt`, saved by the
    `robustness` library): {"model": DataParallel(AttackerModel).state_dict(), "epoch": ...}."""
    seed_case("robust_resnet_tiny")
    cfg = dict(RESNET50_TINY)
    model = build_resnet(cfg)
    wrapped = DataParallelLike(AttackerModel(model, IMAGENET_MEAN, IMAGENET_STD)).eval()
    state = wrapped.state_dict()  # OrderedDict; module.model.* and module.attacker.model.* share storage
    assert "module.model.conv1.weight" in state and "module.attacker.model.conv1.weight" in state
    torch.save({"model": state, "epoch": 7}, out / "robust_resnet_tiny.pt")
    write_json(out / "robust_resnet_tiny.json", cfg)

    image = torch.rand(1, 3, 32, 32)
    pixel_values = ((image.double() - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1))
                    / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)).float()
    m64 = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        logits = m64(pixel_values.double())
        full = copy.deepcopy(wrapped).to(torch.float64).module(image.double())
    assert rel_err(full, logits) < 1e-6
    save_tensors(out / "robust_resnet_tiny_expected.safetensors",
                 {"pixel_values": pixel_values, "logits": logits, "image": image})
    # Round trip as a consumer would: load the .pt, strip `module.model.`, run.
    ck = torch.load(out / "robust_resnet_tiny.pt", weights_only=True)
    sd = {k[len("module.model."):]: v for k, v in ck["model"].items() if k.startswith("module.model.")}
    fresh = TinyResNet(Bottleneck, cfg["layers"], cfg["widths"], cfg["stem_width"], cfg["num_classes"]).eval()
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(fresh(pixel_values), logits) < 1e-4


@fixture("resnet_tiny_plain")
def _(out: Path):
    """A bare torch.save(state_dict) of the resnet18_tiny case's model (same seed, same weights)."""
    seed_case("resnet18_tiny")
    model = build_resnet(RESNET18_TINY)
    torch.save(model.state_dict(), out / "resnet_tiny_plain.pth")


@fixture("robust_resnet_tiny_legacy")
def _(out: Path):
    """The robust_resnet_tiny fixture's checkpoint re-saved in torch's legacy (pre-1.6)
    serialization, under the name the 2019-era robustness checkpoints carry (`.pth.tar`):
    must load to exactly the zip copy's tensors."""
    ck = torch.load(out / "robust_resnet_tiny.pt", weights_only=True)
    torch.save(ck, out / "robust_resnet_tiny_legacy.pth.tar", _use_new_zipfile_serialization=False)
    back = torch.load(out / "robust_resnet_tiny_legacy.pth.tar", weights_only=True)
    assert all(torch.equal(back["model"][k], v) for k, v in ck["model"].items())


@fixture("clip_text_gelu_pytorch_model")
def _(out: Path):
    """The clip_text_gelu case's weights as transformers' `pytorch_model.bin` (torch.save, zip
    format): a diffusers folder's text_encoder/ may hold only that file."""
    sd = load_file(str(REPO / "tests/parity/cases/clip_text_gelu/weights.safetensors"))
    torch.save(sd, out / "clip_text_gelu_pytorch_model.bin")


@fixture("torch_views")
def _(out: Path):
    """Tensors that are views (a transposed one, a slice at an offset, two sharing a storage)
    and other dtypes, saved in both torch.save formats, with the expected values as
    safetensors: the readers must rebuild the views from storage, offset, size and stride."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4, 6, generator=g)
    state = {
        "transposed": base.t(),  # strides (1, 6): not contiguous
        "slice": base[1:3, 2:5],  # offset 8, strides (6, 1)
        "row": base[2],  # shares base's storage, offset 12
        "base": base,
        "half": torch.randn(3, 2, generator=g).half(),
        "double": torch.randn(5, generator=g).double(),
        "long": torch.arange(7),
        "step": 3,  # not a tensor: left out
    }
    torch.save(state, out / "torch_views_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(state, out / "torch_views_zip.pt")
    save_file({k: v.contiguous().clone() for k, v in state.items() if torch.is_tensor(v)},
              str(out / "torch_views_expected.safetensors"))


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "tests/parity/cases"), help="case folders go here")
    ap.add_argument("--fixtures", default=str(REPO / "tests/fixtures"), help="fixture files go here")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these cases / fixtures")
    ap.add_argument("--list", action="store_true", help="list case and fixture names")
    args = ap.parse_args(argv)

    if args.list:
        print("\n".join(list(CASES) + [f"{f} (fixture)" for f in FIXTURES]))
        return 0
    names = args.only or (list(CASES) + list(FIXTURES))
    unknown = [n for n in names if n not in CASES and n not in FIXTURES]
    if unknown:
        ap.error(f"unknown name(s) {unknown}; see --list")

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out, fix = Path(args.out), Path(args.fixtures)
    print(f"versions: {VERSIONS}")
    for n in names:
        if n in CASES:
            out.mkdir(parents=True, exist_ok=True)
            seed_case(n)
            write_case(n, CASES[n](), out)
        else:
            fix.mkdir(parents=True, exist_ok=True)
            FIXTURES[n](fix)
            print(f"  {n:<34} fixture written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
