"""Usage:
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_train.py --preset tiny --threads 2
    .venv/bin/python benchmarks/bench_train.py --preset small paper --device cuda --precision bf16
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_train.py --preset tiny emoji --stages c --profile 8

Training speed per stage: samples/s, peak memory and model FLOPs per sample (so that GPU runs report MFU).

One row per preset and stage: the stage's own `loss` (as train.py calls it, Stage B with its compressor training
jointly), backward and an AdamW step, under the autocast train.py uses; image sizes and batches are train.py's
TRAIN_PRESETS unless --batch-a/b/c say otherwise. Random weights, random images, latents and text tokens (77 × the
text width: 384 for MiniLM, the released CLIP widths at the paper preset): it measures the models, not data loading,
EMA or checkpoints. Times are medians of --steps after --warmup; on a CPU the process CPU time is reported too
(steadier on a shared machine).

FLOPs per sample: torch.utils.flop_counter.FlopCounterMode over one forward + backward, divided by the batch. It
counts matrix multiplies, convolutions and attention (what MFU means by model FLOPs), not element-wise work.
MFU = FLOPs per sample × samples/s ÷ the device's peak dense bf16 rate (--peak-tflops, or a known card's).
Peak memory: benchmarks/common.py (CUDA: max allocated; CPU: RSS growth, approximate after earlier stages).
A stage that runs out of GPU memory is reported as such and the others still run.
With --profile K, one more step runs under torch.profiler, and the K operators with the most self time (their own
time, without the operators they call) are listed per row: where a step's time goes.
Prints a markdown table last and writes every number to --json (and the table to the same name with .md).
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import PeakMemory, machine, markdown_table, median, start, synced, write_json  # noqa: E402

import stage_a  # noqa: E402
import stage_b  # noqa: E402
import stage_c  # noqa: E402
from train import TRAIN_PRESETS  # noqa: E402

# Dense bf16 peak of known cards, TFLOP/s (vendor figures, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def peak_tflops(device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def stage_inputs(stage: str, preset: str, batch: int, side: int, device, tokens: int = 77):
    """(model, loss closure) for one stage with random inputs of train.py's shapes."""
    cfg_a, cfg_b, cfg_c = (m.PRESETS[preset] for m in (stage_a, stage_b, stage_c))
    paper = preset == "paper"                     # the released text widths: CLIP ViT-H for B, ViT-bigG for C
    g = torch.Generator().manual_seed(0)

    def rand(*shape, uniform=False):
        return (torch.rand if uniform else torch.randn)(*shape, generator=g, device="cpu").to(device)

    if stage == "a":
        model, images = stage_a.StageA(cfg_a), rand(batch, 3, side, side, uniform=True)
        return model, lambda: model.loss(images)
    if stage == "b":
        model = stage_b.StageB(cfg_b)
        images, latents = rand(batch, 3, side, side, uniform=True), rand(batch, cfg_b.c_in, side // 4, side // 4)
        text = rand(batch, tokens, cfg_b.c_text if paper else 384)
        return model, lambda: model.loss(latents, images, text, text[:1])
    h = math.ceil(round(side * cfg_b.effnet_resize) / cfg_b.effnet_stride)   # the compressor's latent side
    model = stage_c.Prior(cfg_c)
    semantic, text = rand(batch, cfg_c.c_in, h, h), rand(batch, tokens, cfg_c.c_cond if paper else 384)
    return model, lambda: model.loss(semantic, text, text[:1])


def bench_stage(stage: str, preset: str, args, device, autocast) -> dict:
    train_cfg = TRAIN_PRESETS[preset][stage]
    batch = getattr(args, f"batch_{stage}") or train_cfg.batch_size
    side = train_cfg.image_size
    row = {"preset": preset, "stage": stage.upper(), "batch": batch, "side": side}
    with torch.device(device) if device.type == "cuda" else nullcontext():   # initialised where it trains
        model, loss_fn = stage_inputs(stage, preset, batch, side, device, args.text_length)
    model.to(device).train()
    row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast:
            loss, _ = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:           # one forward + backward, not timed
            with autocast:
                loss, _ = loss_fn()
            loss.backward()
        opt.zero_grad(set_to_none=True)
        row["gflop_per_sample"] = counter.get_total_flops() / batch / 1e9
        wall, cpu = [], []
        with PeakMemory(device) as peak:
            for i in range(args.warmup + args.steps):
                t0, c0 = synced(device), time.process_time()
                step()
                if i >= args.warmup:
                    wall.append(synced(device) - t0)
                    cpu.append(time.process_time() - c0)
        s = median(wall)
        row.update({"step_s": s, "cpu_step_s": median(cpu), "samples_per_s": batch / s, "peak_mib": peak.mib,
                    "peak_how": peak.how, "steps_s": wall})
        row["tflops"] = row["gflop_per_sample"] * row["samples_per_s"] / 1e3
        if args.profile:
            row["profile"] = profile_step(step, device, args.profile)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of GPU memory"
    return row                                    # the model and its optimizer go with this frame


def profile_step(step, device, top: int) -> list[dict]:
    """The `top` operators of one step by self time (CUDA time on a GPU, CPU time otherwise), with their share."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synced(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total}
            for e in events[:top]]


def profile_table(rows: list[dict]) -> str:
    out = [[f"{r['preset']} {r['stage']}", p["op"], p["calls"], f"{p['self_ms']:.1f}", f"{p['share']:.0%}"]
           for r in rows for p in r.get("profile", [])]
    return markdown_table(["row", "operator", "calls", "self ms", "share of the step"], out) if out else ""


def table(rows: list[dict], peak: float | None) -> str:
    out = []
    for r in rows:
        head = [r["preset"], r["stage"], r["batch"], f"{r['side']}²", f"{r['params_M']:.1f}"]
        if "error" in r:
            out.append(head + [r["error"]] + [""] * 5)
            continue
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        out.append(head + [f"{r['samples_per_s']:.2f}", f"{r['step_s'] * 1e3:.0f}", f"{r['peak_mib']:.0f}",
                           f"{r['gflop_per_sample']:.2f}", f"{r['tflops']:.3f}", mfu])
    return markdown_table(["preset", "stage", "batch", "image", "params M", "samples/s", "step ms", "peak MiB",
                           "GFLOP/sample", "TFLOP/s", "MFU"], out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny"], choices=["tiny", "emoji", "small", "paper"])
    p.add_argument("--stages", default="abc", help="which stages, e.g. 'bc'")
    for s in "abc":
        p.add_argument(f"--batch-{s}", type=int, default=None, help=f"Stage {s.upper()} batch (default: train.py's)")
    p.add_argument("--text-length", type=int, default=77, help="text tokens per caption (train.py's default: 32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as train.py")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (medians are reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="also profile one step and list its K costliest operators by self time")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known cards)")
    p.add_argument("--json", default="runs/bench/bench_train.json")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = start(args, __file__, argv)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    torch.manual_seed(0)
    rows = []
    for preset in args.preset:
        for stage in args.stages:
            rows.append(bench_stage(stage, preset, args, device, autocast))
            if device.type == "cuda":
                torch.cuda.empty_cache()                   # the next stage starts from an empty card
            r = rows[-1]
            print(f"[{preset} {stage.upper()}] " + (r.get("error") or f"{r['samples_per_s']:.2f} samples/s, "
                                                     f"{r['gflop_per_sample']:.2f} GFLOP/sample"), file=sys.stderr)
            text = report(args, device, rows)              # after every row: a timeout still leaves numbers
    print(text)


def report(args, device, rows: list[dict]) -> str:
    """Writes --json and the table next to it; returns the table with its setting line."""
    peak = peak_tflops(device, args.peak_tflops)
    setting = (f"{machine()}, torch {torch.__version__} ({args.threads} threads), {args.precision}; medians of "
               f"{args.steps} AdamW steps after {args.warmup} warm-up; MFU against "
               f"{f'{peak:.0f} TFLOP/s' if peak else 'no known peak'}")
    how = next((r["peak_how"] for r in rows if "peak_how" in r), "n/a")
    text = f"{setting}\npeak memory: {how}\n\n{table(rows, peak)}\n"
    if args.profile:
        text += f"\nwhere one step's time goes (torch.profiler, self time):\n\n{profile_table(rows)}\n"
    write_json(args.json, {"setting": setting, "machine": machine(), "torch": torch.__version__,
                           "threads": args.threads, "device": str(device), "precision": args.precision,
                           "peak_tflops": peak, "command": args.command, "rows": rows})
    Path(args.json).with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
