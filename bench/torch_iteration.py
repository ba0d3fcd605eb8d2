"""PyTorch/diffusers reference for one DiffExplainer iteration (issue: GPU iteration speed).

Builds the same architecture as our bench binary with random weights (timing does not depend on
weight values): SD 1.5 UNet x 4 LCM steps from fixed noise, VAE decoder, differentiable resize
to 256 (antialias), ImageNet normalization, ResNet-50, backprop to the 77x768 text conditioning
only (every weight frozen). Prints one JSON line per dtype: median ms per iteration after
warm-up, peak memory, and the gradient norm (a zero norm means a cut gradient).

    python3 bench/torch_iteration.py [--device cuda] [--dtypes float16 bfloat16 float32] [--iters 5]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SCALING_FACTOR = 0.18215


def lcm_coefficients(steps=4, train_steps=1000, original_steps=50):
    """LCMScheduler (SD 1.5 betas) timesteps and per-step scalars, as diffusers computes them."""
    from diffusers import LCMScheduler
    s = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=train_steps, original_inference_steps=original_steps,
                     set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    s.set_timesteps(steps)
    out = []
    ts = [int(t) for t in s.timesteps]
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else t
        a = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[prev]) if i + 1 < len(ts) else float(s.final_alpha_cumprod)
        c_skip, c_out = s.get_scalings_for_boundary_condition_discrete(t)
        out.append(dict(t=t, alpha=a, alpha_prev=a_prev, c_skip=float(c_skip), c_out=float(c_out)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torchvision.models import resnet50

    dev = torch.device(args.device)
    coeffs = lcm_coefficients()
    for name in args.dtypes:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).to(dev, dtype).eval().requires_grad_(False)
        vae = AutoencoderKL(**SD15_VAE).to(dev, dtype).eval().requires_grad_(False)
        clf = resnet50().to(dev, dtype).eval().requires_grad_(False)
        g = torch.Generator(device="cpu").manual_seed(0)
        noise0 = torch.randn(1, 4, 64, 64, generator=g).to(dev, dtype)
        step_noise = [torch.randn(1, 4, 64, 64, generator=g).to(dev, dtype) for _ in coeffs]
        cond0 = torch.randn(1, 77, 768, generator=g).to(dev, dtype)
        mean = torch.tensor([0.485, 0.456, 0.406], device=dev, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=dev, dtype=dtype).view(1, 3, 1, 1)

        def iteration():
            cond = cond0.clone().requires_grad_(True)
            x = noise0
            for i, c in enumerate(coeffs):
                eps = unet(x, c["t"], encoder_hidden_states=cond).sample
                x0 = (x - (1 - c["alpha"]) ** 0.5 * eps) / c["alpha"] ** 0.5
                denoised = c["c_out"] * x0 + c["c_skip"] * x
                x = denoised if i + 1 == len(coeffs) else (
                    c["alpha_prev"] ** 0.5 * denoised + (1 - c["alpha_prev"]) ** 0.5 * step_noise[i])
            image = (vae.decode(x / SCALING_FACTOR).sample / 2 + 0.5).clamp(0, 1)
            image = F.interpolate(image, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
            logits = clf((image - mean) / std)
            logits[0, 207].backward()
            return cond.grad

        times = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for k in range(args.warmup + args.iters):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            grad = iteration()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        print(json.dumps(dict(impl="pytorch", dtype=name, device=str(dev), ms_median=statistics.median(times),
                              ms_all=[round(t, 2) for t in times], peak_gib=round(peak, 3),
                              grad_norm=float(grad.float().norm()))), flush=True)
        del unet, vae, clf
        if dev.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
