"""The reference side of the training-step benchmark: diffusers' UNet2DConditionModel (and
transformers' CLIPTextModel for the text-encoder phase) with random weights, the same step
as `dreambooth-trainer bench` (cached latents, DDPM noise, MSE, grad clip 1.0, AdamW),
printed as one JSON line per mode.

Modes:
  eager   bf16 autocast, fp32 weights, torch.optim.AdamW (foreach), as train_dreambooth.py
  fused   the same with AdamW(fused=True)
  graph   fused + capturable AdamW with a device LR, the whole step captured as one CUDA
          graph after 3 warm-up steps on a side stream (PyTorch's whole-network recipe)
Phases: unet (text embeddings cached) or text-encoder (UNet frozen, differentiated through).
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
TEXT = {
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu"),
    "sd21": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", vocab_size=1000, bos_token_id=998, eos_token_id=999,
                 pad_token_id=999),
}


def text_encoder(args, device):
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(max_position_embeddings=77, **TEXT["tiny" if args.tiny else args.arch])
    return CLIPTextModel(config).to(device).train()


def bench(args, mode):
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    graph = mode == "graph" and device.type == "cuda"
    torch.manual_seed(0)
    config = TINY if args.tiny else (SD15 if args.arch == "sd15" else SD21)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    unet = UNet2DConditionModel(**config).to(device).train()
    encoder = text_encoder(args, device) if args.phase == "text-encoder" else None
    trained = unet if encoder is None else encoder
    if encoder is not None:
        unet.requires_grad_(False)
    lr = torch.tensor(2e-6, device=device) if graph else 2e-6
    fused = mode in ("fused", "graph") and device.type == "cuda"
    optimizer = torch.optim.AdamW(trained.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8, fused=fused, capturable=graph)
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side, device=device)
    context = torch.randn(args.batch, 77, config["cross_attention_dim"], device=device)
    input_ids = torch.randint(0, 1000, (args.batch, 77), device=device)
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
            ctx = context if encoder is None else encoder(input_ids).last_hidden_state
            pred = unet(noisy, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graph)
        return loss.detach()

    run = step
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            static_loss = step()

        def run():
            cuda_graph.replay()
            return static_loss
    for _ in range(args.warmup):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1000 / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
    return {
        "impl": f"diffusers-{mode}",
        "arch": "tiny" if args.tiny else args.arch,
        "phase": "textEncoder" if encoder is not None else "unet",
        "memory": "default",
        "device": str(device),
        "resolution": args.resolution,
        "batch": args.batch,
        "stepsPerSecond": 1000 / ms,
        "imagesPerSecond": 1000 / ms * args.batch,
        "msPerStep": ms,
        "peakGib": peak,
        "peakReservedGib": reserved,
        "finalLoss": loss.item(),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sd21"])
    parser.add_argument("--phase", default="unet", choices=["unet", "text-encoder"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--modes", default="eager,fused,graph")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--fp32", action="store_true")
    parser.add_argument("--device", default=None)
    args, _ = parser.parse_known_args()  # run.sh passes our trainer's flags too
    for mode in args.modes.split(","):
        try:
            print(json.dumps(bench(args, mode)), flush=True)
        except Exception as error:  # one mode failing must not hide the others
            print(json.dumps({"impl": f"diffusers-{mode}", "error": repr(error)[:300]}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
