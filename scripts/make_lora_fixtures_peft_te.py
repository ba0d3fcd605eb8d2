#!/usr/bin/env python3
"""Writes two more LoRA fixtures into tests/fixtures/lora/ (beside make_lora_fixture.py's):

- `peft_*`: a PEFT LoRA on the tiny UNet2DConditionModel of `unet.safetensors`, saved by diffusers'
  `save_lora_weights`, so its alpha lives only in the safetensors header
  (`lora_adapter_metadata`: lora_alpha = 2 x rank, plus one alpha_pattern entry), and the weights
  diffusers gets by loading that file and fusing it. Reading the LoRA without the header would
  fuse at 1x instead of 2x.
- `te_*`: a kohya LoRA on a tiny transformers CLIPTextModel (`lora_te_text_model_encoder_...` on
  q/k/v/out_proj and fc1/fc2), and the text encoder weights diffusers gets by loading it
  (kohya -> PEFT conversion) and fusing it.

Run by hand from the repository root (needs torch, diffusers, peft, transformers; CPU):

    python3 scripts/make_lora_fixtures_peft_te.py
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import diffusers
import peft
import transformers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
SCALE = 0.7
RANK = 2


def tiny_unet():
    return UNet2DConditionModel(
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


def randomize_lora_(model, generator):
    """PEFT initializes lora_B to zeros (the LoRA would change nothing): draw A and B."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def fuse_all_(model, scale):
    """diffusers' `_fuse_lora_apply`: scale each tuner layer, then merge it into the weight."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if scale != 1.0:
                module.scale_layer(scale)
            module.merge()


def changed(base, model):
    """The merged weights that differ from `base`, under their plain names (a merged tuner
    layer keeps its weight as `<module>.base_layer.weight`)."""
    now = {
        k.replace(".base_layer.", "."): v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }
    return {k: now[k] for k in base if not torch.equal(base[k], now[k])}


def peft_fixture():
    torch.manual_seed(0)
    unet = tiny_unet()
    base = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    config = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
        alpha_pattern={"down_blocks.0.attentions.0.proj_in": 3.0},
    )
    unet.add_adapter(config)
    randomize_lora_(unet, torch.Generator().manual_seed(2))
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        OUT,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=config.to_dict(),
        weight_name="peft_lora.safetensors",
        safe_serialization=True,
    )
    path = os.path.join(OUT, "peft_lora.safetensors")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 2 * RANK, meta
    # No alpha tensors: the header is the only place the alpha is.
    with safe_open(path, "pt") as f:
        assert not any(k.endswith(".alpha") for k in f.keys())

    # What a diffusers user gets: load the file into a fresh UNet, fuse.
    fresh = tiny_unet()
    fresh.load_state_dict(base)
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        path, return_lora_metadata=True
    )
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, fresh, metadata=metadata)
    fuse_all_(fresh, SCALE)
    fused = changed(base, fresh)
    n_adapted = len(layers) // 2
    assert len(fused) == n_adapted, (len(fused), n_adapted)
    # The base is make_lora_fixture.py's UNet (same seed and config): not written twice.
    committed = load_file(os.path.join(OUT, "unet.safetensors"))
    assert committed.keys() == base.keys() and all(torch.equal(committed[k], base[k]) for k in base)
    save_file(fused, os.path.join(OUT, "peft_fused.safetensors"))
    return {"lora_scale": SCALE, "rank": RANK, "lora_alpha": 2 * RANK, "adapted": n_adapted}


def te_fixture():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    te = CLIPTextModel(cfg).eval()
    base = {k: v.detach().clone().contiguous() for k, v in te.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    kohya = {}
    alpha = 3.0
    # transformers 5 names the modules `encoder.layers...` (4.x: `text_model.encoder...`);
    # kohya LoRAs in the wild were trained on 4.x names: `lora_te_text_model_encoder_...`.
    targets = [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(n.startswith("encoder.layers.") for n in targets), targets
    for n in targets:
        m = dict(te.named_modules())[n]
        key = "lora_te_text_model_" + n.replace(".", "_")
        kohya[key + ".lora_down.weight"] = 0.1 * torch.randn(RANK, m.in_features, generator=g)
        kohya[key + ".lora_up.weight"] = 0.1 * torch.randn(m.out_features, RANK, generator=g)
        kohya[key + ".alpha"] = torch.tensor(alpha)
    save_file(kohya, os.path.join(OUT, "te_lora_kohya.safetensors"))

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(kohya))
    assert all(k.startswith("text_encoder.") for k in state_dict), list(state_dict)[:3]
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state_dict, alphas, te, prefix="text_encoder"
    )
    fuse_all_(te, SCALE)
    fused = changed(base, te)
    assert len(fused) == len(targets), (len(fused), len(targets))
    # The formula, to be sure the fixture holds what the docs claim.
    for n in targets:
        key = "lora_te_text_model_" + n.replace(".", "_")
        delta = SCALE * alpha / RANK * kohya[key + ".lora_up.weight"] @ kohya[key + ".lora_down.weight"]
        assert torch.allclose(fused[n + ".weight"], base[n + ".weight"] + delta, atol=1e-6), n
    save_file(base, os.path.join(OUT, "te_base.safetensors"))
    save_file(fused, os.path.join(OUT, "te_fused.safetensors"))
    with open(os.path.join(OUT, "te_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1, default=str)
    return {"lora_scale": SCALE, "rank": RANK, "alpha": alpha, "adapted": len(targets)}


def main():
    os.makedirs(OUT, exist_ok=True)
    info = {
        "peft": peft_fixture(),
        "text_encoder": te_fixture(),
        "versions": {
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    with open(os.path.join(OUT, "fixtures_peft_te.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
