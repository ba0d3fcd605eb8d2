#!/usr/bin/env python3
"""Writes a `world train-vae` snapshot (vae/snapshots/step-N.safetensors, diffusers names, with
vae/snapshots/config.json) as a diffusers model folder OUT/vae/ that AutoencoderKL.from_pretrained
loads (ours and diffusers'), with `scaling_factor` set as SD's: 1 / the standard deviation of the
posterior means of the given images (PNG files, [0, 1] → [-1, 1]).

    python3 scripts/export_vae_snapshot.py RUN_DIR STEP IMAGE_DIR OUT

Used to hand an intermediate autoencoder to the UNet helper before training ends; the final
folder is written by `world train-vae` itself.
"""

import json
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file


def main():
    run, step, image_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    snaps = os.path.join(run, "vae", "snapshots")
    config = json.load(open(os.path.join(snaps, "config.json")))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    vae = AutoencoderKL(**config)
    weights = load_file(os.path.join(snaps, f"step-{step:06d}.safetensors"))
    vae.load_state_dict(weights, strict=True)
    vae.eval()
    files = sorted(f for f in os.listdir(image_dir) if f.endswith(".png"))
    x = np.stack([np.asarray(Image.open(os.path.join(image_dir, f)).convert("RGB")) for f in files])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 128]).latent_dist.mean for i in range(0, len(x), 128)])
    scaling = 1.0 / z.double().std(unbiased=False).item()
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    print(f"step {step}: scaling_factor {scaling:.5f} from {len(files)} images; wrote {out}/vae")


if __name__ == "__main__":
    main()
