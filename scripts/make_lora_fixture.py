#!/usr/bin/env python3
"""Writes tests/fixtures/lora/: a tiny diffusers UNet, a kohya-format LoRA on every one of its
attention, resnet, sampler and time-embedding-projection layers (linear, 1x1 and 3x3 conv), and
the weights diffusers gets by loading that LoRA and fusing it (lora_scale 0.7), for
tests/lora.rs.

Run by hand from the repository root (needs torch, diffusers and peft; CPU is enough):

    python3 scripts/make_lora_fixture.py

Every module gets the same alpha: diffusers 0.42.1 with peft 0.21 turns per-module kohya alphas
of attention layers into PEFT `alpha_pattern` keys that match nothing (it warns and ignores
them), so with mixed alphas diffusers itself departs from the LoRA formula.
"""

import json
import os

import torch
from safetensors.torch import save_file

import diffusers
import peft
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
SCALE = 0.7
RANK = 2
ALPHA = 4.0


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    base = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}

    g = torch.Generator().manual_seed(1)
    modules = dict(unet.named_modules())
    targets = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and n not in ("conv_in", "conv_out")
        and not n.startswith("time_embedding")
    ]
    kohya = {}
    for n in targets:
        m = modules[n]
        if isinstance(m, torch.nn.Linear):
            down = torch.randn(RANK, m.in_features, generator=g)
            up = torch.randn(m.out_features, RANK, generator=g)
        else:
            down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, RANK, 1, 1, generator=g)
        key = "lora_unet_" + n.replace(".", "_")
        kohya[key + ".lora_down.weight"] = (down * 0.1).contiguous()
        kohya[key + ".lora_up.weight"] = (up * 0.1).contiguous()
        kohya[key + ".alpha"] = torch.tensor(ALPHA)

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(kohya))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet)
    unet.fuse_lora(lora_scale=SCALE)
    unet.unload_lora()
    fused = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    changed = {k: fused[k] for k in base if not torch.equal(base[k], fused[k])}
    assert len(changed) == len(targets), (len(changed), len(targets))

    save_file(base, os.path.join(OUT, "unet.safetensors"))
    save_file(kohya, os.path.join(OUT, "lora_kohya.safetensors"))
    save_file(changed, os.path.join(OUT, "fused.safetensors"))
    with open(os.path.join(OUT, "fixture.json"), "w") as f:
        json.dump(
            {
                "lora_scale": SCALE,
                "rank": RANK,
                "alpha": ALPHA,
                "adapted": len(targets),
                "versions": {
                    "diffusers": diffusers.__version__,
                    "peft": peft.__version__,
                    "torch": torch.__version__,
                },
            },
            f,
            indent=1,
        )
    print(f"wrote {OUT}: {len(base)} base tensors, {len(targets)} adapted")


if __name__ == "__main__":
    main()
