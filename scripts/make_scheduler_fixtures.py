#!/usr/bin/env python3
"""Writes tests/fixtures/schedulers/*.json: diffusers' schedulers step by step on small random
tensors, and a few full sampling loops with a fake analytic model, for tests/schedulers.rs.

Run by hand from the repository root (needs torch and diffusers; CPU is enough):

    python3 scripts/make_scheduler_fixtures.py

The scheduler configs are the hand-written copies of the Hub repos' scheduler_config.json in
tests/fixtures/schedulers/configs/ (see the README there). The LCM cases use
`LCMScheduler.from_config(<SD 1.5 config>)`, as the lcm-lora-sdv1-5 model card recommends.

Noise: LCM and Euler ancestral draw noise inside `step` with `randn_tensor`; the script replaces
that function by one that returns the next tensor of a fixed sequence, which is exactly what the
Rust side receives as `noise`.
"""

import json
import os

import numpy as np
import torch

import diffusers
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "schedulers")
CONFIGS = os.path.join(OUT, "configs")
SHAPE = (2, 4, 3, 3)

CLASSES = {
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
}

# name, scheduler, config file, config overrides, steps
CASES = [
    ("ddim_sd15_4", "ddim", "sd15.json", {}, 4),
    ("ddim_sd15_50", "ddim", "sd15.json", {}, 50),
    ("ddim_sd15_trailing_3", "ddim", "sd15.json", {"timestep_spacing": "trailing"}, 3),
    ("ddim_sd15_linspace_7", "ddim", "sd15.json", {"timestep_spacing": "linspace"}, 7),
    ("ddim_sd15_sample_4", "ddim", "sd15.json", {"prediction_type": "sample"}, 4),
    ("ddim_sd21_v_5", "ddim", "sd21.json", {}, 5),
    ("ddim_linear_alpha1_4", "ddim", "sd15.json",
     {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "set_alpha_to_one": True}, 4),
    ("lcm_sd15_4", "lcm", "sd15.json", {}, 4),
    ("lcm_sd15_1", "lcm", "sd15.json", {}, 1),
    ("lcm_sd15_8", "lcm", "sd15.json", {}, 8),
    ("lcm_sd15_v_3", "lcm", "sd15.json", {"prediction_type": "v_prediction"}, 3),
    ("lcm_sd15_sample_2", "lcm", "sd15.json", {"prediction_type": "sample"}, 2),
    ("lcm_sd15_orig25_3", "lcm", "sd15.json", {"original_inference_steps": 25, "timestep_scaling": 5.0}, 3),
    ("euler_a_sdturbo_1", "euler_ancestral", "sd_turbo.json", {}, 1),
    ("euler_a_sdturbo_4", "euler_ancestral", "sd_turbo.json", {}, 4),
    # No timestep_spacing in the SD 1.5 config: Euler's own default, "linspace", applies.
    ("euler_a_sd15_5", "euler_ancestral", "sd15.json", {}, 5),
    ("euler_a_sd15_leading_3", "euler_ancestral", "sd15.json", {"timestep_spacing": "leading"}, 3),
    ("euler_a_sd21_v_3", "euler_ancestral", "sd21.json", {}, 3),
]

# Full sampling loops with a fake model: name, scheduler, config, overrides, steps, guidance
RUNS = [
    ("run_lcm_sd15_4", "lcm", "sd15.json", {}, 4, None),
    ("run_lcm_sd15_4_cfg", "lcm", "sd15.json", {}, 4, 1.5),
    ("run_euler_a_sdturbo_1", "euler_ancestral", "sd_turbo.json", {}, 1, None),
    ("run_euler_a_sdturbo_3_cfg", "euler_ancestral", "sd_turbo.json", {}, 3, 2.0),
    ("run_ddim_sd15_5", "ddim", "sd15.json", {}, 5, None),
]


class FixedNoise:
    """Stands in for diffusers' randn_tensor: returns the given tensors in order."""

    def __init__(self):
        self.queue = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        t = self.queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.to(dtype=dtype or t.dtype)


FIXED = FixedNoise()
scheduling_lcm.randn_tensor = FIXED
scheduling_euler_ancestral_discrete.randn_tensor = FIXED


def make_scheduler(kind, config_file, overrides):
    with open(os.path.join(CONFIGS, config_file)) as f:
        config = json.load(f)
    config.update(overrides)
    return CLASSES[kind].from_config(config), config


def flat(t):
    return [float(x) for x in t.detach().to(torch.float32).flatten().tolist()]


def coefficients(kind, s, i):
    t = s.timesteps[i]
    if kind == "ddim":
        prev = int(t) - s.config.num_train_timesteps // s.num_inference_steps
        a = s.alphas_cumprod[int(t)]
        ap = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
        return {"alpha_prod_t": float(a), "alpha_prod_t_prev": float(ap)}
    if kind == "lcm":
        prev = s.timesteps[i + 1] if i + 1 < len(s.timesteps) else t
        a = s.alphas_cumprod[int(t)]
        ap = s.alphas_cumprod[int(prev)] if prev >= 0 else s.final_alpha_cumprod
        c_skip, c_out = s.get_scalings_for_boundary_condition_discrete(t)
        return {"alpha_prod_t": float(a), "alpha_prod_t_prev": float(ap),
                "c_skip": float(c_skip), "c_out": float(c_out)}
    sigma_from = s.sigmas[i]
    sigma_to = s.sigmas[i + 1]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return {"sigma": float(sigma_from), "sigma_next": float(sigma_to),
            "sigma_up": float(sigma_up), "sigma_down": float(sigma_down)}


def step_case(name, kind, config_file, overrides, steps, seed):
    s, config = make_scheduler(kind, config_file, overrides)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=g) * float(s.init_noise_sigma)
    record = {
        "scheduler": kind,
        "config": config,
        "steps": steps,
        "shape": list(SHAPE),
        "init_noise_sigma": float(s.init_noise_sigma),
        "alphas_cumprod": flat(s.alphas_cumprod),
        "timesteps": [float(t) for t in s.timesteps],
        "initial_sample": flat(sample),
        "per_step": [],
    }
    for i, t in enumerate(s.timesteps):
        model_output = torch.randn(SHAPE, generator=g)
        noise = torch.randn(SHAPE, generator=g)
        coeffs = coefficients(kind, s, i)
        scaled = s.scale_model_input(sample, t)
        FIXED.queue = [noise]
        out = s.step(model_output, t, sample)
        used = len(FIXED.queue) == 0
        FIXED.queue = []
        record["per_step"].append({
            "timestep": float(t),
            "coefficients": coeffs,
            "model_output": flat(model_output),
            "noise": flat(noise),
            "noise_used": used,
            "scaled_model_input": flat(scaled),
            "prev_sample": flat(out.prev_sample),
        })
        sample = out.prev_sample
    return record


def fake_model(x, t, c):
    # Must match tests/schedulers.rs::fake_model.
    return torch.tanh(0.5 * x + 0.002 * float(t)) + 0.3 * c


def run_case(name, kind, config_file, overrides, steps, guidance, seed):
    s, config = make_scheduler(kind, config_file, overrides)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    initial_noise = torch.randn(SHAPE, generator=g)
    cond = torch.randn(SHAPE, generator=g)
    uncond = torch.randn(SHAPE, generator=g)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(steps)]
    # The StableDiffusionPipeline loop.
    latents = initial_noise * s.init_noise_sigma
    intermediates = []
    for i, t in enumerate(s.timesteps):
        if guidance is not None:
            x = torch.cat([latents, latents])
            x = s.scale_model_input(x, t)
            e_u, e_c = fake_model(x, t, torch.cat([uncond, cond])).chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        else:
            x = s.scale_model_input(latents, t)
            eps = fake_model(x, t, cond)
        FIXED.queue = [noises[i]]
        latents = s.step(eps, t, latents).prev_sample
        FIXED.queue = []
        intermediates.append(flat(latents))
    return {
        "scheduler": kind,
        "config": config,
        "steps": steps,
        "guidance_scale": guidance,
        "shape": list(SHAPE),
        "timesteps": [float(t) for t in s.timesteps],
        "initial_noise": flat(initial_noise),
        "cond": flat(cond),
        "uncond": flat(uncond),
        "step_noises": [flat(n) for n in noises],
        "intermediates": intermediates,
        "final": flat(latents),
    }


def main():
    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    for k, (name, kind, cfg, ov, steps) in enumerate(CASES):
        rec = step_case(name, kind, cfg, ov, steps, seed=1000 + k)
        rec["versions"] = versions
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(rec, f)
    for k, (name, kind, cfg, ov, steps, guidance) in enumerate(RUNS):
        rec = run_case(name, kind, cfg, ov, steps, guidance, seed=2000 + k)
        rec["versions"] = versions
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(rec, f)
    print(f"wrote {len(CASES)} step cases and {len(RUNS)} runs to {OUT} ({versions})")


if __name__ == "__main__":
    np.random.seed(0)
    main()
