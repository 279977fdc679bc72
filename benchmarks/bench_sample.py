"""Usage:
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_sample.py --preset tiny small --threads 1 --runs 9
    .venv/bin/python benchmarks/bench_sample.py --preset paper --device cuda --precision bf16 --batch 1 4

Sampling speed: ours against diffusers' Würstchen (0.42.1) at the same weights, timesteps, guidance and seed.

What is compared. For each preset, diffusers' WuerstchenPrior, WuerstchenDiffNeXt and PaellaVQModel are built with
the preset's sizes (`diffusers_kwargs` maps our configs to their constructor arguments), filled with seeded random
weights and saved with save_pretrained; ours are loaded from those folders by our own loaders. Both sides then
sample from the same random text encodings with the released defaults (the 29-call prior list at guidance 4, 12
decoder steps without guidance) and the same torch.Generator seed:
- stage C: the prior half of sample.generate  vs  WuerstchenPriorPipeline(prompt_embeds=..., negative_prompt_embeds=...)
- stage B: the decoder half                   vs  WuerstchenDecoderPipeline(output_type="latent")
- stage A: StageA.decode + clamp               vs  the lines that pipeline runs after its loop (× scale, decode, clamp)
Text encoding is excluded from every time: ours takes encodings, diffusers' prior pipeline takes prompt_embeds, and
its decoder pipeline (which has no prompt_embeds argument) gets an encode_prompt returning the same encodings.
diffusers runs as shipped (its pipelines' own no_grad), except that its prior gets diffusers' own SDPA attention
processor, as its decoder has by default: both sides then run the same kernels and the images are bit-identical,
and diffusers is no slower (faster at the tiny preset on a CPU). --diffusers-attn default keeps the prior's shipped
plain-matmul attention (the images then differ by ~1e-6, the two kernels' rounding). Both sides run under the same
autocast when --precision bf16.

Runs alternate which side goes first, so that a load change on a shared machine hits both; medians of --runs
after --warmup, in wall seconds and (on a CPU) process CPU seconds, which lost time slices do not inflate. Every
run's images are compared (max absolute difference). FLOPs: one counted run of ours (FlopCounterMode). Peak memory:
benchmarks/common.py; on a CPU each side is measured in a fresh subprocess that loads the same folders and samples
once.
Prints a markdown table last and writes every number to --json (and the table to the same name with .md).
"""
import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (PeakMemory, machine, markdown_table, median, randomize, start,  # noqa: E402
                    synced, write_json)

import sample  # noqa: E402
import stage_a  # noqa: E402
import stage_b  # noqa: E402
import stage_c  # noqa: E402
from schedule import STAGE_B_STEPS, STAGE_C_TIMESTEPS, linear_timesteps  # noqa: E402

SIDES = {"tiny": 64, "small": 256, "paper": 1024}
STAGES = ("stage C", "stage B", "stage A")
ROWS = (*STAGES, "total")


# ----------------------------------------------------------------------------------------------------------------
# Our configs → diffusers' constructor arguments (the inverse of each stage file's config_from_diffusers)
# ----------------------------------------------------------------------------------------------------------------
def diffusers_kwargs(preset: str) -> dict:
    a, b, c = (m.PRESETS[preset] for m in (stage_a, stage_b, stage_c))
    return {
        "prior": dict(c_in=c.c_in, c=c.c, c_cond=c.c_cond, c_r=c.c_r, depth=c.depth, nhead=c.nhead, dropout=c.dropout),
        "decoder": dict(c_in=b.c_in, c_out=b.c_in, c_r=b.c_r, patch_size=b.patch_size, c_cond=b.c_cond,
                        c_hidden=list(b.c_hidden), nhead=[h if att else -1 for h, att in zip(b.nhead, b.attention)],
                        blocks=list(b.blocks), level_config=["CTA" if att else "CT" for att in b.attention],
                        inject_effnet=list(b.inject_semantic), effnet_embd=b.c_semantic, clip_embd=b.c_text,
                        kernel_size=b.kernel_size, dropout=b.dropout),
        "vqgan": dict(levels=a.levels, bottleneck_blocks=a.bottleneck_blocks, embed_dim=a.c_hidden,
                      latent_channels=a.c_latent, num_vq_embeddings=a.codebook_size, scale_factor=a.scale_factor),
        # Pipeline-level numbers, which live in no model folder: the prior's output map (× mean − std) and the sizes.
        "prior_pipeline": dict(latent_mean=c.semantic_scale, latent_std=c.semantic_shift,
                               resolution_multiple=b.resolution_multiple),
        "decoder_pipeline": dict(latent_dim_scale=b.latent_dim_scale),
    }


def _wuerstchen():
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # deprecation and `accelerate` notices on every load
    import diffusers.pipelines.deprecated.wuerstchen as dw
    return dw


def build_folders(preset: str, folder: Path, seed: int, device):
    """diffusers' three modules at the preset's sizes, random weights, saved as diffusers folders under `folder`.
    Built and filled on `device` (seconds for the paper preset's 2 billion parameters on a GPU), saved from CPU."""
    dw, kw = _wuerstchen(), diffusers_kwargs(preset)
    classes = {"prior": (dw.WuerstchenPrior, ("out.",)),           # small heads: the prior's |1 − b| away from 0,
               "decoder": (dw.WuerstchenDiffNeXt, ("clf.",)),      # the decoder's b near 1/2 rather than 1e-3
               "vqgan": (dw.PaellaVQModel, ())}
    for i, (name, (cls, small)) in enumerate(classes.items()):
        with torch.device(device) if device.type == "cuda" else nullcontext():
            module = randomize(cls(**kw[name]), seed + i, small=small)
        module.cpu().save_pretrained(folder / name)
        del module


def load_ours(preset: str, folder: Path, device):
    """Ours from the diffusers folders. The prior-space map and the size multiples are pipeline settings that no
    folder holds, so they come from the preset, as diffusers' pipelines get them from diffusers_kwargs."""
    cfg_b, cfg_c = stage_b.PRESETS[preset], stage_c.PRESETS[preset]
    with torch.device(device) if device.type == "cuda" else nullcontext():   # built where they run: fast on a GPU
        prior, stage_b_model, vqgan = (stage_c.load_pretrained(folder / "prior", device=device),
                                       stage_b.load_pretrained(folder / "decoder", device=device),
                                       stage_a.load_pretrained(folder / "vqgan", device=device))
    prior.config = dataclasses.replace(prior.config, semantic_shift=cfg_c.semantic_shift,
                                       semantic_scale=cfg_c.semantic_scale)
    decoder = stage_b_model.decoder                                       # the compressor is not needed
    del stage_b_model
    decoder.config = dataclasses.replace(decoder.config, resolution_multiple=cfg_b.resolution_multiple,
                                         latent_dim_scale=cfg_b.latent_dim_scale)
    # The mapping above is only right if our loaders read back exactly the preset's model config, less the tiny
    # preset's token convolutions (text_conv), which are ours: diffusers' prior, like the released one, has none.
    assert prior.config == dataclasses.replace(cfg_c, text_conv=0), (prior.config, cfg_c)
    decoder_fields = [f.name for f in dataclasses.fields(stage_b.StageBConfig) if not f.name.startswith("effnet_")]
    assert all(getattr(decoder.config, f) == getattr(cfg_b, f) for f in decoder_fields), (decoder.config, cfg_b)
    assert vqgan.config.levels == stage_a.PRESETS[preset].levels
    return {"prior": prior.eval(), "decoder": decoder.eval(), "vqgan": vqgan.eval()}


class _EncodingsGiven(torch.nn.Module):
    """Stands in for the prior pipeline's text encoder, which is only asked for its dtype and device when
    prompt_embeds are given. The encodings stay float32, as ours do; under --precision bf16, autocast casts them
    on both sides."""
    dtype = torch.float32

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)


def load_diffusers(preset: str, folder: Path, device, attn: str):
    dw, kw = _wuerstchen(), diffusers_kwargs(preset)
    from diffusers import DDPMWuerstchenScheduler
    prior = dw.WuerstchenPrior.from_pretrained(folder / "prior").to(device).eval()
    if attn == "sdpa":                            # its DiffNeXt already uses SDPA; its prior defaults to matmuls
        from diffusers.models.attention_processor import AttnProcessor2_0
        prior.set_attn_processor(AttnProcessor2_0())
    decoder = dw.WuerstchenDiffNeXt.from_pretrained(folder / "decoder").to(device).eval()
    vqgan = dw.PaellaVQModel.from_pretrained(folder / "vqgan").to(device).eval()
    # from_pretrained leaves CPU tensors where they lie in the file's buffer, at offsets that are not 64-byte
    # aligned, and MKL rounds an unaligned matmul differently (~1e-7 per matmul, ~1e-5 in the small preset's
    # images). Fresh copies, aligned as ours are after load_state_dict, make the images bit-identical. (.to(cuda)
    # copies anyway.)
    if torch.device(device).type == "cpu":
        with torch.no_grad():
            for module in (prior, decoder, vqgan):
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.data = tensor.data.clone()
    prior_pipe = dw.WuerstchenPriorPipeline(tokenizer=None, text_encoder=_EncodingsGiven(device), prior=prior,
                                            scheduler=DDPMWuerstchenScheduler(), **kw["prior_pipeline"])
    decoder_pipe = dw.WuerstchenDecoderPipeline(tokenizer=None, text_encoder=None, decoder=decoder,
                                                scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan,
                                                **kw["decoder_pipeline"])
    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
    return {"prior_pipe": prior_pipe, "decoder_pipe": decoder_pipe, "vqgan": vqgan}


# ----------------------------------------------------------------------------------------------------------------
# One sampling run per side
# ----------------------------------------------------------------------------------------------------------------
def make_inputs(preset: str, batch: int, device, seed: int) -> dict:
    """Random stand-ins for the encoded caption and empty caption, (batch, 77, width) for each text model."""
    width_c, width_b = stage_c.PRESETS[preset].c_cond, stage_b.PRESETS[preset].c_text
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(batch, 77, w, generator=g).to(device)
            for k, w in (("text_c", width_c), ("text_c_uncond", width_c), ("text_b", width_b),
                         ("text_b_uncond", width_b))}


class Clock:
    """Wall and process-CPU seconds at each call, after the device has finished its queued work. On a shared CPU,
    CPU seconds at one thread are far steadier than wall seconds (time slices lost to other processes do not
    count), so CPU runs report both."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def __call__(self, *_) -> float:
        wall = synced(self.device)
        self.marks.append((wall, time.process_time()))
        return wall

    def timings(self) -> dict:
        """Marks (start, C, B, A, end) → seconds per stage and in total, wall and CPU."""
        (w0, c0), *stages, (w1, c1) = self.marks
        out = {"total": w1 - w0, "cpu total": c1 - c0}
        for name, (wa, ca), (wb, cb) in zip(STAGES, stages, stages[1:]):
            out.update({name: wb - wa, f"cpu {name}": cb - ca})
        return out


def run_ours(m, inputs, args, side, device, seed, autocast, timings: dict) -> torch.Tensor:
    clock, synced_time = Clock(device), sample._synced_time
    sample._synced_time = clock                   # generate's own stage boundaries, read through our clock
    try:
        clock()
        with autocast:
            images = sample.generate(m["prior"], m["decoder"], m["vqgan"], **inputs, height=side, width=side,
                                     prior_timesteps=args.prior_ts, decoder_timesteps=args.decoder_ts,
                                     prior_guidance=args.prior_guidance, decoder_guidance=args.decoder_guidance,
                                     generator=torch.Generator(device).manual_seed(seed), device=device, timings={})
        clock()
    finally:
        sample._synced_time = synced_time
    timings.update(clock.timings())
    return images


def run_diffusers(d, inputs, args, side, device, seed, autocast, timings: dict) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(seed)
    text_b, text_b_uncond = inputs["text_b"], inputs["text_b_uncond"]
    # Text encoding excluded: the decoder pipeline's own encode_prompt would run the tokenizer and the text model.
    d["decoder_pipe"].encode_prompt = lambda prompt, device, n, cfg, negative=None: (text_b, text_b_uncond if cfg
                                                                                     else None)
    clock = Clock(device)
    clock(), clock()                              # start, then the start of stage C (as generate marks it)
    with autocast:
        semantic = d["prior_pipe"](prompt_embeds=inputs["text_c"], negative_prompt_embeds=inputs["text_c_uncond"],
                                   height=side, width=side, timesteps=[float(t) for t in args.prior_ts],
                                   guidance_scale=args.prior_guidance, generator=g,
                                   output_type="pt").image_embeddings
        clock()
        latents = d["decoder_pipe"](image_embeddings=semantic, prompt="",
                                    timesteps=[float(t) for t in args.decoder_ts],
                                    guidance_scale=args.decoder_guidance, generator=g, output_type="latent").images
        clock()
        with torch.no_grad():                     # what WuerstchenDecoderPipeline runs after its loop
            images = d["vqgan"].decode(d["vqgan"].config.scale_factor * latents).sample.clamp(0, 1)
    clock(), clock()                              # the end of stage A, then the end
    timings.update(clock.timings())
    return images


RUNNERS = {"ours": run_ours, "diffusers": run_diffusers}


def load_side(name, args, preset, folder, device):
    return load_ours(preset, folder, device) if name == "ours" else \
        load_diffusers(preset, folder, device, args.diffusers_attn)


def peak_memory_cpu(name, args, preset, folder, batch, side) -> dict:
    """One side's peak extra memory for one sampling call, in a fresh process: RSS bookkeeping is per process."""
    cmd = [sys.executable, __file__, "--memory-probe", name, "--folder", str(folder), "--preset", preset,
           "--batch", str(batch), "--side", str(side), "--threads", str(args.threads), "--precision", args.precision,
           "--prior-steps", str(args.prior_steps), "--decoder-steps", str(args.decoder_steps),
           "--seed", str(args.seed), "--diffusers-attn", args.diffusers_attn]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"memory probe for {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_probe(args):
    """--memory-probe SIDE: load that side, sample once, print {"mib", "how"} as the last line."""
    device, preset = torch.device(args.device), args.preset[0]
    m = load_side(args.memory_probe, args, preset, Path(args.folder), device)
    inputs = make_inputs(preset, args.batch[0], device, args.seed)
    with PeakMemory(device) as peak:
        RUNNERS[args.memory_probe](m, inputs, args, args.side, device, args.seed, autocast_for(args, device), {})
    print(json.dumps({"mib": peak.mib, "how": peak.how}))


def autocast_for(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def bench_preset(args, preset: str, device, folder: Path):
    """Yields one result per --batch, for one preset."""
    t_build = time.perf_counter()
    names = ("prior", "decoder", "vqgan")
    if args.keep and all((folder / n / "config.json").exists() for n in names):
        print(f"[{preset}] reusing the weights in {folder}", file=sys.stderr)
    else:
        build_folders(preset, folder, args.seed, device)
    sides = {name: load_side(name, args, preset, folder, device) for name in ("ours", "diffusers")}
    if args.compile:            # a second copy of ours, compiled in place (it keeps its type, config and methods)
        sides["ours compiled"] = load_side("ours", args, preset, folder, device)
        sample.compile_models(*sides["ours compiled"].values())
    print(f"[{preset}] built and loaded in {time.perf_counter() - t_build:.1f} s", file=sys.stderr)
    side = args.side or SIDES[preset]
    side_made = sample.valid_side(side, sides["ours"]["decoder"].config)
    if side_made != side:
        raise SystemExit(f"--side {side}: the {preset} decoder cannot make it; the next valid side is {side_made}")
    autocast = autocast_for(args, device)
    runner = {name: run_diffusers if name == "diffusers" else run_ours for name in sides}
    for batch in args.batch:
        inputs = make_inputs(preset, batch, device, args.seed)
        times = {name: [] for name in sides}
        max_diff, image_stats = {name: 0.0 for name in sides if name != "diffusers"}, {}
        for i in range(args.warmup + args.runs):
            order = list(sides)[i % len(sides):] + list(sides)[:i % len(sides)]    # each side leads in turn
            images, run_times = {}, {}
            for name in order:
                run_times[name] = {}
                images[name] = runner[name](sides[name], inputs, args, side, device, args.seed + i, autocast,
                                            run_times[name])
                if i >= args.warmup:
                    times[name].append(run_times[name])
            ref = images["diffusers"].float()
            for name in max_diff:
                max_diff[name] = max(max_diff[name], (images[name].float() - ref).abs().max().item())
            image_stats = {"shape": list(ref.shape), "std": ref.std().item(),
                           "inside_0_1": ((ref > 0) & (ref < 1)).float().mean().item()}
            print(f"[{preset} b{batch}] run {i + 1}/{args.warmup + args.runs}"
                  f"{' (warm-up)' if i < args.warmup else ''}: "
                  + ", ".join(f"{n} {run_times[n]['total']:.3f} s" for n in sides)
                  + "; max |diff| so far " + ", ".join(f"{n} {d:.1e}" for n, d in max_diff.items()), file=sys.stderr)
        medians = {n: {k: median(t[k] for t in times[n]) for k in times[n][0]} for n in sides}
        flops = None
        if args.flops:                            # one extra run of ours, counted (matmuls, convs, attention)
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                run_ours(sides["ours"], inputs, args, side, device, args.seed, autocast, {})
            flops = counter.get_total_flops()
        memory = {}
        for name in ("ours", "diffusers"):
            if device.type == "cuda":
                with PeakMemory(device) as peak:
                    runner[name](sides[name], inputs, args, side, device, args.seed, autocast, {})
                memory[name] = {"mib": peak.mib, "how": peak.how}
            elif args.memory:
                memory[name] = peak_memory_cpu(name, args, preset, folder, batch, side)
        yield ({"preset": preset, "side": side, "batch": batch, "median_s": medians, "runs_s": times,
               "ratio": {n: {k: medians[n][k] / medians["diffusers"][k] for k in medians[n]}
                         for n in sides if n != "diffusers"},
               "max_abs_diff": max_diff, "image_stats": image_stats, "peak_memory": memory,
               "gflop_per_image": flops / batch / 1e9 if flops else None})


def table(results: list[dict], cpu: bool) -> str:
    """Wall-clock medians and their ratios to diffusers; on a CPU also the ratio of CPU-time medians."""
    compiled = any("ours compiled" in r["ratio"] for r in results)
    rows = []
    for r in results:
        head = [r["preset"], f"{r['side']}²", r["batch"]]
        for s in ROWS:
            m, ratio = r["median_s"], r["ratio"]
            rows.append(head + [s, f"{m['ours'][s]:.3f}", f"{m['diffusers'][s]:.3f}", f"{ratio['ours'][s]:.2f}"]
                        + ([f"{ratio['ours'][f'cpu {s}']:.2f}"] if cpu else [])
                        + ([f"{m['ours compiled'][s]:.3f}", f"{ratio['ours compiled'][s]:.2f}"] if compiled else []))
        blank = [""] * (cpu + 2 * compiled)
        mem = r["peak_memory"]
        if mem:
            o, d = mem["ours"]["mib"], mem["diffusers"]["mib"]
            rows.append(head + ["peak MiB", f"{o:.0f}", f"{d:.0f}", f"{o / d:.2f}" if d > 0 else "n/a"] + blank)
        diff = r["max_abs_diff"]
        rows.append(head + ["max abs diff", f"{diff['ours']:.1e}", "", ""] + [""] * cpu
                    + ([f"{diff['ours compiled']:.1e}", ""] if compiled else []))
        if r["gflop_per_image"]:
            rows.append(head + ["GFLOP per image", f"{r['gflop_per_image']:.1f}", "", ""] + blank)
    return markdown_table(["preset", "size", "batch", "stage", "ours s", "diffusers s", "ours/diffusers"]
                          + (["same, CPU time"] if cpu else [])
                          + (["ours compiled s", "compiled/diffusers"] if compiled else []), rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny", "small"], choices=sorted(SIDES))
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="images per run (each is one table block)")
    p.add_argument("--side", type=int, default=None, help="image side (default: 64 / 256 / 1024 per preset)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast on both sides")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per side (medians are reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prior-steps", type=int, default=0, help="linear prior steps (0: the released 29-call list)")
    p.add_argument("--decoder-steps", type=int, default=STAGE_B_STEPS)
    p.add_argument("--prior-guidance", type=float, default=4.0)
    p.add_argument("--decoder-guidance", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diffusers-attn", choices=["sdpa", "default"], default="sdpa",
                   help="diffusers' prior attention: its SDPA processor (default here) or its shipped matmul one")
    p.add_argument("--compile", action="store_true",
                   help="also time a compiled copy of ours (sample.compile_models; diffusers stays eager)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU memory subprocesses")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip counting FLOPs")
    p.add_argument("--json", default="runs/bench/bench_sample.json")
    p.add_argument("--keep", default=None,
                   help="keep the diffusers folders under this path, and reuse those already there")
    p.add_argument("--memory-probe", choices=list(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.prior_ts = linear_timesteps(args.prior_steps) if args.prior_steps else STAGE_C_TIMESTEPS
    args.decoder_ts = linear_timesteps(args.decoder_steps)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = start(args, __file__, argv)
    if args.memory_probe:
        return memory_probe(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.preset:
            folder = Path(args.keep or tmp) / preset
            for result in bench_preset(args, preset, device, folder):
                results.append(result)
                text = report(args, device, results)       # after every block: a timeout still leaves numbers
    print(text)


def report(args, device, results: list[dict]) -> str:
    """Writes --json and the table next to it; returns the table with its setting line."""
    calls = len(args.prior_ts) - 1
    setting = (f"{machine()}, torch {torch.__version__} ({args.threads} threads), {args.precision}; prior "
               f"{calls} calls at guidance {args.prior_guidance}, decoder {args.decoder_steps} steps at guidance "
               f"{args.decoder_guidance}; medians of {args.runs} runs after {args.warmup} warm-up; text encoding "
               f"excluded; diffusers prior attention: {'SDPA' if args.diffusers_attn == 'sdpa' else 'shipped (matmul)'}"
               + ("; plus a compiled copy of ours (its first run, compiling, is a warm-up)" if args.compile else ""))
    memory_how = next((m["how"] for r in results for m in r["peak_memory"].values()), "not measured")
    text = f"{setting}\npeak memory: {memory_how}\n\n{table(results, device.type == 'cpu')}\n"
    import diffusers
    write_json(args.json, {"setting": setting, "machine": machine(), "torch": torch.__version__,
                           "diffusers": diffusers.__version__, "threads": args.threads, "device": str(device),
                           "precision": args.precision, "command": args.command, "results": results})
    Path(args.json).with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
