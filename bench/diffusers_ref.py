"""The reference side of the training-step benchmark: diffusers' UNet2DConditionModel
with random weights, the same step as `dreambooth-trainer bench` (cached latents and text
embeddings, DDPM noise, MSE, grad clip 1.0, AdamW), printed as one JSON line per mode.

Modes:
  eager        bf16 autocast, fp32 weights, torch.optim.AdamW (foreach), as train_dreambooth.py
  fused        the same with AdamW(fused=True)
Run: python bench/diffusers_ref.py --arch sd15 --resolution 512 --batch 1 --steps 50 [--tiny]
"""

import argparse
import json
import time

import torch
from diffusers import UNet2DConditionModel

SD15 = dict(
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    layers_per_block=2,
    sample_size=64,
)
SD21 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
            use_linear_projection=True, upcast_attention=True, sample_size=96)
TINY = dict(
    attention_head_dim=4,
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    norm_num_groups=8,
)


def bench(args, mode):
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    torch.manual_seed(0)
    config = TINY if args.tiny else (SD15 if args.arch == "sd15" else SD21)
    unet = UNet2DConditionModel(**config).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-6, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8, fused=(mode == "fused" and device.type == "cuda"))
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side, device=device)
    context = torch.randn(args.batch, 77, config["cross_attention_dim"], device=device)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device=device) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    autocast = device.type == "cuda" and not args.fp32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000 / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "impl": f"diffusers-{mode}",
        "arch": "tiny" if args.tiny else args.arch,
        "device": str(device),
        "resolution": args.resolution,
        "batch": args.batch,
        "stepsPerSecond": 1000 / ms,
        "imagesPerSecond": 1000 / ms * args.batch,
        "msPerStep": ms,
        "peakGib": peak,
        "finalLoss": loss.item(),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sd21"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="eager,fused")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    for mode in args.modes.split(","):
        print(json.dumps(bench(args, mode)), flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
