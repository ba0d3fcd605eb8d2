#!/usr/bin/env python3
"""Writes the diffusion-model parity cases (UNet2DConditionModel, AutoencoderKL, and a whole
4-step LCM sample + decode) into tests/parity/cases/, in the format of docs/parity-format.md.

Run by hand (not in CI): needs torch and diffusers (CPU is enough).

    python3 scripts/make_parity_cases_diffusion.py [--out tests/parity/cases] [--only NAME ...]

Every case is a tiny random configuration of the reference class itself. All parameters are
re-drawn at random (diffusers zero-initializes some output projections, which would hide a cut
gradient), the reference runs in float64, and everything is saved as float32.
"""

import argparse
import json
import math
import os

import torch
import diffusers
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from diffusers.schedulers import scheduling_lcm
from safetensors.torch import save_file

SEED = 20240611


def reference(cls):
    return f"diffusers {diffusers.__version__} {cls.__module__}.{cls.__name__} (torch {torch.__version__})"


def randomize_(model, generator):
    """Re-draws every parameter: norm scales around 1, everything else ~ N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)
            module_name, kind = leaf[0], leaf[1]
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            is_norm = any(part.startswith("norm") or part in ("group_norm", "conv_norm_out")
                          for part in module_name.split("."))
            if is_norm and kind == "weight":
                p.copy_(1.0 + 0.2 * noise)
            elif kind == "bias":
                p.copy_(0.2 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.shape[0]
                p.copy_(noise / math.sqrt(fan_in))


def save_case(out_dir, name, *, kind, model, cls, inputs, grad_inputs, run, options=None):
    """`run(model, inputs) -> {output name: tensor}`; reference computed in float64."""
    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    model = model.double().eval()
    # diffusers' own config.json (save_pretrained writes exactly this).
    model.save_config(path)
    write_case(path, kind=kind, reference=reference(cls), weights=model.state_dict(),
               inputs=inputs, grad_inputs=grad_inputs, run=lambda x: run(model, x), options=options)


def write_case(path, *, kind, reference, weights, inputs, grad_inputs, run, options=None):
    """Everything but config.json: `run(inputs) -> {output name: tensor}` in float64."""
    weights = {k: v.detach().float().contiguous() for k, v in weights.items()}
    save_file(weights, os.path.join(path, "weights.safetensors"))

    # The model sees exactly the float32 values that are saved.
    inputs32 = {k: v.float().contiguous() for k, v in inputs.items()}
    leaves = {}
    for k, v in inputs32.items():
        t = v.double()
        if k in grad_inputs:
            t.requires_grad_(True)
        leaves[k] = t
    outputs = run(leaves)

    gen = torch.Generator().manual_seed(SEED + 1)
    cotangents = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in outputs.items()}
    objective = sum((outputs[k] * cotangents[k]).sum() for k in outputs)
    grads = torch.autograd.grad(objective, [leaves[k] for k in grad_inputs]) if grad_inputs else []

    expected = {k: v.detach().float().contiguous() for k, v in outputs.items()}
    for k, g in zip(grad_inputs, grads):
        expected[f"grad.{k}"] = g.float().contiguous()
    save_file(inputs32, os.path.join(path, "inputs.safetensors"))
    save_file({k: v.float().contiguous() for k, v in cotangents.items()},
              os.path.join(path, "cotangents.safetensors"))
    save_file(expected, os.path.join(path, "expected.safetensors"))

    case = {
        "kind": kind,
        "reference": reference,
        "outputs": sorted(outputs),
        "grad_inputs": list(grad_inputs),
    }
    if options:
        case["options"] = options
    with open(os.path.join(path, "case.json"), "w") as f:
        json.dump(case, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def tiny_unet(**overrides):
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg)


def unet_case(out_dir, name, model, generator, timestep, size=(8, 8)):
    randomize_(model, generator)
    inputs = {
        "sample": torch.randn(1, 4, *size, generator=generator, dtype=torch.float64),
        "timestep": torch.tensor([timestep], dtype=torch.float64),
        "encoder_hidden_states": torch.randn(1, 5, 12, generator=generator, dtype=torch.float64),
    }

    def run(m, x):
        out = m(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample
        return {"sample": out}

    save_case(out_dir, name, kind="unet2d_condition", model=model, cls=UNet2DConditionModel,
              inputs=inputs, grad_inputs=["sample", "encoder_hidden_states"], run=run)


def tiny_vae(**overrides):
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    config.update(overrides)
    return AutoencoderKL(**config)


class FixedNoise:
    """Stands in for diffusers' randn_tensor inside LCMScheduler.step: returns the given tensors
    in order (as scripts/make_scheduler_fixtures.py does), so the reference path uses exactly the
    noises the case stores."""

    def __init__(self):
        self.queue = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        t = self.queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.to(dtype=dtype or t.dtype)


# SD 1.5's scheduler/scheduler_config.json; LCMScheduler.from_config(it), as the lcm-lora-sdv1-5
# model card does.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def lcm_sample_decode_case(out_dir, name, steps=4):
    """A whole DiffExplainer forward: `steps` LCM steps of a tiny UNet from fixed noise, then the
    tiny VAE decoder on `latents / scaling_factor`; gradients w.r.t. the text conditioning."""
    gen = torch.Generator().manual_seed(SEED + 7)
    unet = tiny_unet()
    randomize_(unet, gen)
    vae = tiny_vae()
    randomize_(vae, gen)
    unet, vae = unet.double().eval(), vae.double().eval()
    scheduler = LCMScheduler.from_config(SD15_SCHEDULER)
    shape = (1, 4, 8, 8)
    inputs = {
        "initial_noise": torch.randn(shape, generator=gen, dtype=torch.float64),
        "step_noises": torch.randn((steps,) + shape, generator=gen, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(1, 5, 12, generator=gen, dtype=torch.float64),
    }
    fixed = FixedNoise()
    scheduling_lcm.randn_tensor = fixed

    def run(x):
        # LatentConsistencyModelPipeline's loop (no guidance embedding: time_cond_proj_dim is
        # None, as for LCM-LoRA), then its decode of the last step's `denoised`.
        scheduler.set_timesteps(steps)
        latents = x["initial_noise"] * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            eps = unet(latents, t, encoder_hidden_states=x["encoder_hidden_states"]).sample
            fixed.queue = [x["step_noises"][i]]
            latents, denoised = scheduler.step(eps, t, latents, return_dict=False)
            fixed.queue = []
        sample = vae.decode(denoised / vae.config.scaling_factor).sample
        return {"latents": denoised, "sample": sample}

    path = os.path.join(out_dir, name)
    os.makedirs(path, exist_ok=True)
    config = {
        "unet": json.loads(unet.to_json_string()),
        "vae": json.loads(vae.to_json_string()),
        "scheduler": json.loads(scheduler.to_json_string()),
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    # The decoder half only: the encoder takes no part in sampling.
    weights.update({f"vae.{k}": v for k, v in vae.state_dict().items()
                    if k.startswith(("decoder.", "post_quant_conv."))})
    ref = (f"diffusers {diffusers.__version__} LCMScheduler.from_config(SD 1.5 scheduler config), "
           f"{steps} steps of UNet2DConditionModel, then AutoencoderKL.decode(denoised / "
           f"scaling_factor) (torch {torch.__version__})")
    write_case(path, kind="lcm_sample_decode", reference=ref, weights=weights, inputs=inputs,
               grad_inputs=["encoder_hidden_states"], run=run, options={"steps": steps})


def unet_odd_size_case(out_dir):
    """Three blocks on a 10x6 sample: not a multiple of 2^2, so diffusers forwards each skip's
    size to the upsampler (`forward_upsample_size`); 10 -> 5 -> 3 and 6 -> 3 -> 2 on the way
    down, 3 -> 5 -> 10 and 2 -> 3 -> 6 on the way up. Its own generator, so the other cases
    keep their numbers."""
    gen = torch.Generator().manual_seed(SEED + 11)
    model = tiny_unet(
        block_out_channels=(4, 8, 8),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet_case(out_dir, "unet2d_condition_odd_size", model, gen, timestep=250.0, size=(10, 6))


def vae_no_mid_attention_cases(out_dir):
    """Encoder and decoder with `mid_block_add_attention=False` (the world's autoencoder has no
    mid-block attention). Their own generator, so the other cases keep their numbers."""
    gen = torch.Generator().manual_seed(SEED + 13)
    vae = tiny_vae(mid_block_add_attention=False)
    randomize_(vae, gen)
    latents = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    save_case(out_dir, "vae_decoder_no_mid_attention", kind="vae_decoder", model=vae,
              cls=AutoencoderKL, inputs={"latents": latents}, grad_inputs=["latents"],
              run=lambda m, x: {"sample": m.decode(x["latents"]).sample})
    vae = tiny_vae(mid_block_add_attention=False)
    randomize_(vae, gen)
    image = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    save_case(out_dir, "vae_encoder_no_mid_attention", kind="vae_encoder", model=vae,
              cls=AutoencoderKL, inputs={"image": image}, grad_inputs=["image"],
              run=lambda m, x: {"latent_mean": m.encode(x["image"]).latent_dist.mean})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "parity", "cases"))
    parser.add_argument("--only", nargs="*", help="write only these cases (default: all)")
    args = parser.parse_args()
    out = os.path.normpath(args.out)
    if args.only is None or "lcm_sample_decode" in args.only:
        lcm_sample_decode_case(out, "lcm_sample_decode")
    if args.only is None or "unet2d_condition_odd_size" in args.only:
        unet_odd_size_case(out)
    if args.only is None or "vae_no_mid_attention" in args.only:
        vae_no_mid_attention_cases(out)
    alone = {"lcm_sample_decode", "unet2d_condition_odd_size", "vae_no_mid_attention"}
    if args.only is not None and not set(args.only) <= alone:
        parser.error(f"--only supports {sorted(alone)} (the other cases share one generator)")
    if args.only is not None:
        return
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    # SD 1.x layout: conv 1x1 proj_in/proj_out, one head count for every block.
    unet_case(out, "unet2d_condition_sd1", tiny_unet(), gen, timestep=421.0)
    # SD 2.x layout: linear proj_in/proj_out, per-block head counts, upcast attention, freq_shift 1,
    # two transformer layers per attention.
    unet_case(
        out,
        "unet2d_condition_sd2",
        tiny_unet(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True,
                  freq_shift=1, transformer_layers_per_block=2),
        gen,
        timestep=37.5,
    )

    vae = tiny_vae()
    randomize_(vae, gen)
    latents = torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64)
    save_case(out, "vae_decoder", kind="vae_decoder", model=vae, cls=AutoencoderKL,
              inputs={"latents": latents}, grad_inputs=["latents"],
              run=lambda m, x: {"sample": m.decode(x["latents"]).sample})

    vae = tiny_vae()
    randomize_(vae, gen)
    image = torch.rand(1, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    save_case(out, "vae_encoder", kind="vae_encoder", model=vae, cls=AutoencoderKL,
              inputs={"image": image}, grad_inputs=["image"],
              run=lambda m, x: {"latent_mean": m.encode(x["image"]).latent_dist.mean})


if __name__ == "__main__":
    main()
