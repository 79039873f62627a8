"""diffusers as a client of our single-file export.

Driven by `diffusers_reads_our_single_file.rs` (one subcommand per Python process, so only
one full-size model is in memory at a time):

  make --out DIR --reference REF.npy
      Builds a full-size Stable Diffusion 1.5 pipeline with random weights (the published
      SD 1.5 configs below, fixed seeds), saves it with `save_pretrained` as an fp32
      safetensors diffusers folder, then reloads the folder with
      `StableDiffusionPipeline.from_pretrained` and renders the reference image.

  check --file MODEL.safetensors --config DIR --reference REF.npy
      Loads MODEL.safetensors (the original SD layout, as `dreambooth-trainer convert`
      writes it) with `StableDiffusionPipeline.from_single_file(file, config=DIR)`, compares
      every UNet, VAE and text-encoder tensor with the folder's files, renders the same
      image and prints one JSON line: the mean and max abs pixel difference vs REF.npy.

  render --model DIR [--sampler S] [--steps N] [--size PX] [--out FILE.png]
      One timed sample from a diffusers folder (for side-by-side timings with
      `dreambooth-trainer sample`); prints one JSON line with the seconds it took.

The image is rendered the same way every time: DDIM (the folder's scheduler), 4 steps,
128x128, guidance 7.5, `torch.Generator("cpu").manual_seed(0)`, `output_type="np"`.
Everything is local: `local_files_only=True`, no network. Needs torch, diffusers==0.42.1,
transformers==5.24.0 and safetensors (the project venv, see scripts/bootstrap-libtorch.sh).
"""

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

try:
    import numpy as np
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
except ImportError as e:  # the Rust test shows stderr: say exactly what is missing
    sys.exit(f"diffusers_client.py: cannot import {e.name!r} ({e}). It needs torch, diffusers==0.42.1, "
             f"transformers==5.24.0, safetensors and numpy in {sys.executable}; "
             "run scripts/bootstrap-libtorch.sh (make bootstrap).")

HERE = Path(__file__).resolve().parent
CLIP_VOCAB = HERE / "fixtures" / "clip-vocab"

PROMPT = "a photo of an astronaut riding a horse on the moon"
RENDER = dict(num_inference_steps=4, guidance_scale=7.5, height=128, width=128)
SEED = 0

# The published runwayml/stable-diffusion-v1-5 configs (also in fixtures/keys/sd15.json).
UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
# tokenizer/ as the SD 1.5 repo has it: vocab.json, merges.txt and these two files.
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}
TOKENIZER_CONFIG = dict(SPECIAL_TOKENS, add_prefix_space=False, do_lower_case=True, errors="replace",
                        model_max_length=77, tokenizer_class="CLIPTokenizer")

# module attribute -> (subfolder, safetensors stem) in a diffusers folder
WEIGHT_FILES = {"unet": ("unet", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
                "text_encoder": ("text_encoder", "model")}


def write_tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_VOCAB / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2, sort_keys=True) + "\n")


def perturb_norms_and_biases(module: torch.nn.Module, gen: torch.Generator):
    """Default init leaves norm weights at 1 and many biases at 0, which a loader that
    forgets them would reproduce; move every 1-D parameter off its init value.
    Matrices keep their default (well-scaled) init so the image stays unsaturated."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def render(pipe: StableDiffusionPipeline, **overrides) -> np.ndarray:
    """The reference render: HxWx3 float32 in [0, 1]."""
    args = dict(RENDER, **overrides)
    with torch.inference_mode():
        out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **args)
    return np.asarray(out.images[0], dtype=np.float32)


def image_stats(image: np.ndarray) -> dict:
    return {"image_mean": float(image.mean()), "image_std": float(image.std()),
            "saturated_fraction": float(((image <= 0.0) | (image >= 1.0)).mean())}


def cmd_make(args):
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    started = time.monotonic()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    staging = out.parent / (out.name + ".tokenizer")
    write_tokenizer(staging)
    tokenizer = CLIPTokenizer.from_pretrained(staging, local_files_only=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    for module in (text_encoder, unet, vae):
        perturb_norms_and_biases(module, gen)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizer folder exactly as the real SD repos have it (transformers 5 saves another layout).
    shutil.rmtree(out / "tokenizer")
    shutil.move(staging, out / "tokenizer")
    built = time.monotonic()
    del pipe, vae, unet, text_encoder
    gc.collect()

    # The reference comes from the saved folder, as any user of the folder would render it.
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    image = render(pipe)
    np.save(args.reference, image)
    print(json.dumps({"build_save_s": round(built - started, 1), "reload_render_s": round(time.monotonic() - built, 1),
                      **image_stats(image)}))


def compare_weights(pipe: StableDiffusionPipeline, folder: Path) -> dict:
    """Every tensor of the folder's weight files against the module diffusers built from
    the single file; read one tensor at a time so only one model is ever in memory."""
    problems, count, max_diff = [], 0, 0.0
    for attr, (sub, stem) in WEIGHT_FILES.items():
        state = getattr(pipe, attr).state_dict()
        seen = set()
        with safe_open(folder / sub / f"{stem}.safetensors", framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix("text_model.") if attr == "text_encoder" else key
                if name.endswith("position_ids"):
                    continue
                seen.add(name)
                if name not in state:
                    problems.append(f"{attr}.{name}: in the folder, not in the loaded model")
                    continue
                ours, theirs = f.get_tensor(key), state[name]
                if ours.shape != theirs.shape:
                    problems.append(f"{attr}.{name}: folder {tuple(ours.shape)}, loaded {tuple(theirs.shape)}")
                    continue
                count += 1
                max_diff = max(max_diff, (ours.float() - theirs.float()).abs().max().item())
        extra = sorted(k for k in state if k not in seen and not k.endswith("position_ids"))
        problems += [f"{attr}.{k}: in the loaded model, not in the folder" for k in extra]
    return {"tensors_compared": count, "max_weight_diff": max_diff, "weight_problems": problems[:20]}


def cmd_check(args):
    started = time.monotonic()
    pipe = StableDiffusionPipeline.from_single_file(args.file, config=args.config, safety_checker=None,
                                                    requires_safety_checker=False, torch_dtype=torch.float32,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.monotonic()
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    result = compare_weights(pipe, Path(args.config))
    image = render(pipe)
    reference = np.load(args.reference)
    diff = np.abs(image.astype(np.float64) - reference.astype(np.float64))
    print(json.dumps({"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                      "load_s": round(loaded - started, 1), "compare_render_s": round(time.monotonic() - loaded, 1),
                      **result, **image_stats(image)}))


def cmd_render(args):
    started = time.monotonic()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if args.sampler == "dpmpp-2m-karras":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                                 algorithm_type="dpmsolver++", solver_order=2)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    loaded = time.monotonic()
    image = render(pipe, num_inference_steps=args.steps, height=args.size, width=args.size)
    sampled = time.monotonic()
    if args.out:
        from PIL import Image
        Image.fromarray((image * 255).round().astype(np.uint8)).save(args.out)
    print(json.dumps({"load_s": round(loaded - started, 1), "sample_s": round(sampled - loaded, 1),
                      "total_s": round(sampled - started, 1), **image_stats(image)}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="full-size random SD 1.5 folder + reference image")
    make.add_argument("--out", required=True)
    make.add_argument("--reference", required=True)
    check = sub.add_parser("check", help="from_single_file(file, config=folder) vs the reference")
    check.add_argument("--file", required=True)
    check.add_argument("--config", required=True)
    check.add_argument("--reference", required=True)
    rend = sub.add_parser("render", help="one timed sample from a folder")
    rend.add_argument("--model", required=True)
    rend.add_argument("--sampler", choices=["ddim", "dpmpp-2m-karras"], default="dpmpp-2m-karras")
    rend.add_argument("--steps", type=int, default=30)
    rend.add_argument("--size", type=int, default=512)
    rend.add_argument("--out")
    args = parser.parse_args(argv)
    {"make": cmd_make, "check": cmd_check, "render": cmd_render}[args.command](args)


if __name__ == "__main__":
    main()
