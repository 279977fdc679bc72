"""Usage:
    .venv/bin/python benchmarks/gpu_smoke.py                          # small preset, 256², bf16 on CUDA
    .venv/bin/python benchmarks/gpu_smoke.py --preset tiny --device cpu --precision fp32   # a CPU dry run

One training step of each stage and one sampling run, timed: the GPU check of issue 3.

Random weights and random text tokens (77 × 384, the width of the project's MiniLM encoder), so that it needs no
checkpoint and no text encoder: it measures the models, not the data pipeline. Each training row is AdamW steps
under the same autocast as train.py, after warm-up steps; peak memory is torch.cuda.max_memory_allocated, reset
per row. Prints a table last and writes the numbers to --json.
"""
import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stage_a  # noqa: E402
import stage_b  # noqa: E402
import stage_c  # noqa: E402
from sample import generate, latent_sizes  # noqa: E402

SIDES = {"tiny": 64, "small": 256, "paper": 1024}


def synced(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def train_row(name, model, loss_fn, device, autocast, steps, warmup, batch):
    """Median seconds per AdamW step of `loss_fn(model)` → (it/s, samples/s, peak GiB)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peak_reset(device)
    times = []
    for i in range(warmup + steps):
        t0 = synced(device)
        with autocast:
            loss, _ = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(synced(device) - t0)
    s = statistics.median(times)
    model.cpu()
    del opt
    return {"what": f"train {name}", "batch": batch, "it/s": 1 / s, "samples/s": batch / s, "peak GiB": peak_gib(device)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", default="small", choices=sorted(SIDES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch", type=int, default=8, help="training batch per stage")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="gpu_smoke.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available here; "
                         "use --device cpu for a dry run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    side, n = SIDES[args.preset], args.batch
    cfg_a, cfg_b, cfg_c = (m.PRESETS[args.preset] for m in (stage_a, stage_b, stage_c))
    if args.preset == "paper":               # the released text widths: CLIP ViT-H for B, ViT-bigG for C
        text_b_width, text_c_width = cfg_b.c_text, cfg_c.c_cond
    else:
        text_b_width = text_c_width = 384
    torch.manual_seed(0)
    g = lambda *shape: torch.randn(*shape, device=device)                 # noqa: E731
    images = torch.rand(n, 3, side, side, device=device)
    (hc, wc), (hb, wb) = latent_sizes(side, side, cfg_b)

    rows = []
    a = stage_a.StageA(cfg_a)
    rows.append(train_row("A", a, lambda m: m.loss(images), device, autocast, args.steps, args.warmup, n))
    b = stage_b.StageB(cfg_b)
    latents, text_b = g(n, cfg_b.c_in, hb, wb), g(n, 77, text_b_width)
    rows.append(train_row("B", b, lambda m: m.loss(latents, images, text_b, text_b[:1]), device, autocast,
                          args.steps, args.warmup, n))
    c = stage_c.Prior(cfg_c)
    semantic, text_c = g(n, cfg_c.c_in, hc, wc), g(n, 77, text_c_width)
    rows.append(train_row("C", c, lambda m: m.loss(semantic, text_c, text_c[:1]), device, autocast,
                          args.steps, args.warmup, n))

    # Sampling: the released defaults (29 prior calls with CFG 4, 12 decoder steps), batch 1.
    a, b, c = (m.to(device).eval() for m in (a, b.decoder, c))
    tc, tb = g(1, 77, text_c_width), g(1, 77, text_b_width)
    peak_reset(device)
    times, per_stage = [], []
    with torch.inference_mode(), autocast:
        for i in range(1 + 3):
            timings = {}
            t0 = synced(device)
            generate(c, b, a, tc, torch.zeros_like(tc), tb, torch.zeros_like(tb), side, side,
                     generator=torch.Generator(device).manual_seed(i), device=device, timings=timings)
            if i:                                                         # the first run is warm-up
                times.append(synced(device) - t0)
                per_stage.append(timings)
    s = statistics.median(times)
    stages = {k: statistics.median(t[k] for t in per_stage) for k in per_stage[0]}
    rows.append({"what": f"sample {side}² (C/B/A s: " + "/".join(f"{v:.2f}" for v in stages.values()) + ")",
                 "batch": 1, "it/s": 1 / s, "samples/s": 1 / s, "peak GiB": peak_gib(device)})

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "preset": args.preset, "side": side, "precision": args.precision, "torch": torch.__version__,
            "rows": rows}
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"{info['device']}, preset {args.preset} at {side}², {args.precision}, torch {torch.__version__}")
    print(f"{'':46} {'batch':>5} {'it/s':>8} {'samples/s':>10} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['what']:46} {r['batch']:>5} {r['it/s']:>8.2f} {r['samples/s']:>10.1f} {r['peak GiB']:>9.2f}")


if __name__ == "__main__":
    main()
