"""Usage:
    .venv/bin/python benchmarks/bench_finetune.py --device cuda --precision bf16      # the paper prior at 1024²
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_finetune.py --depth 1 --threads 1 --steps 2 --warmup 0 \
        --json runs/bench/finetune_paper_depth1.json                # on a CPU: then --depth 2, then --scale (below)

Fine-tuning Stage C on one device: peak memory and step time of the whole prior against LoRA adapters
(train.py --lora-rank), each with and without gradient checkpointing (--grad-checkpoint), at batch 1 and 4.

Each row is train.py's step for the prior: its loss on a random semantic latent of the size an image of --side gives
(1024² → 16×24×24 at the paper preset) and 77 random caption tokens of the preset's text width, backward, AdamW
on the parameters that train, and the EMA update of those. Random weights: memory and time do not depend on their
values. Times are medians of --steps after --warmup.

Memory, per row, in MiB:
- `state`: what the weights, the optimizer and the EMA hold, counted: 4 bytes per weight (fp32, which bf16 autocast
  keeps as the master copy), and per trained weight 4 for its gradient, 8 for AdamW's two moments and 4 for its
  EMA (train.make_ema: a LoRA run's EMA shares the frozen base);
- `kept for backward`: the activations autograd keeps from the forward pass to the backward pass, counted exactly
  (distinct storages, parameters excluded; with checkpointing, each block triple's input instead of its insides);
- `peak`: measured over building the model and optimizer and running the steps (CUDA: max allocated; CPU: growth of
  the peak RSS, approximate: the allocator keeps and reuses memory), so it adds workspace and transients, and with
  checkpointing the triple that backward recomputes at a time.
`--depth` and `--c` shrink the prior (on a CPU, the paper's 32 blocks of width 1536 take minutes a step). The state
grows with depth × c² and the activations with depth × batch × latent positions, so two runs at two depths scale up
to the preset's: `--scale A.json B.json` counts the preset's state exactly (the model built on the meta device) and
extrapolates what backward keeps linearly in depth (see `scale`):
    .venv/bin/python benchmarks/bench_finetune.py --scale runs/bench/finetune_paper_depth1.json \
        runs/bench/finetune_paper_depth2.json --json runs/bench/finetune_paper_scaled.json
"""
import argparse
import dataclasses
import gc
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import PeakMemory, machine, markdown_table, median, start, synced, write_json  # noqa: E402

import lora  # noqa: E402
import stage_b  # noqa: E402
import stage_c  # noqa: E402
from train import make_ema  # noqa: E402


def state_mib(model) -> float:
    weights = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (4 * weights + 16 * trained) / 2 ** 20


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """`with SavedForBackward(model) as s:` counts in `s.mib` the distinct storages that autograd keeps for the
    backward pass, other than the model's parameters: the activations, exactly, on any device. Inside a
    checkpointed block torch's own hooks take over, so there it counts nothing; what checkpointing keeps instead is
    each block's input (see `kept_inputs_mib`)."""

    def __init__(self, model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.sizes = {}

        def pack(t):
            storage = t.untyped_storage()          # alive until backward, so no other storage reuses its address
            if storage.data_ptr() not in params:
                self.sizes[storage.data_ptr()] = storage.nbytes()
            return t
        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self

    @property
    def mib(self) -> float:
        return sum(self.sizes.values()) / 2 ** 20


def kept_inputs_mib(cfg, batch: int, h: int) -> float:
    """With --grad-checkpoint, each of the depth block triples keeps its input, the (B, c, h, w) fp32 residual stream."""
    return cfg.depth * batch * cfg.c * h * h * 4 / 2 ** 20


def bench_row(cfg, side: int, batch: int, mode: str, checkpoint: bool, args, device, autocast) -> dict:
    h = math.ceil(side / stage_b.PRESETS["paper"].resolution_multiple)          # 1024 → 24, as released
    row = {"mode": mode, "grad_checkpoint": checkpoint, "batch": batch, "latent": f"{cfg.c_in}×{h}×{h}"}
    g = torch.Generator().manual_seed(0)
    semantic = torch.randn(batch, cfg.c_in, h, h, generator=g).to(device)
    text = torch.randn(batch, 77, cfg.c_cond, generator=g).to(device)
    times = []
    try:
        with PeakMemory(device) as mem:
            model = build(cfg, mode, args.rank, device).train()
            model.grad_checkpoint = checkpoint
            ema = make_ema(model)                                   # train.py keeps one, on the device
            trained, trained_ema = zip(*[(p, e) for p, e in zip(model.parameters(), ema.parameters())
                                         if p.requires_grad])
            trained, trained_ema = list(trained), list(trained_ema)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            for step in range(args.warmup + args.steps):
                t0 = synced(device)
                with autocast, SavedForBackward(model) if step == 0 else nullcontext() as saved:
                    loss, _ = model.loss(semantic, text, text[:1])
                if step == 0:
                    row["saved_mib"] = saved.mib + (kept_inputs_mib(cfg, batch, h) if checkpoint else 0.0)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():                               # train.update_ema, past ema_start
                    torch._foreach_lerp_(trained_ema, trained, 0.01)
                if step >= args.warmup:
                    times.append(synced(device) - t0)
        row.update(trainable_M=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
                   state_mib=state_mib(model), peak_mib=mem.mib, memory=mem.how,
                   step_ms=1000 * median(times), samples_per_s=batch / median(times))
        del model, opt, ema
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory ({str(e).splitlines()[0][:80]})"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def build(cfg, mode: str, rank: int, device) -> stage_c.Prior:
    """The prior, initialised where it trains (a GPU initialises 1B weights in a second; the meta device only
    counts them), with rank-`rank` adapters on its attention projections for mode 'lora'."""
    with torch.device(device):
        model = stage_c.Prior(cfg)
        if mode == "lora":
            lora.add_lora(model, lora.target_names(model, "attention"), rank, float(rank))
    return model


def scale(paths: list[str], cfg) -> list[dict]:
    """Rows at cfg.depth from runs at two smaller depths (same width, side, rank and batches). The state is counted
    on the meta device. What backward keeps grows by one block triple per unit of depth, so it is extrapolated
    linearly from the exact counts (saved_mib); a checkpointed row adds the one triple that backward recomputes at a
    time (the slope of the same row without checkpointing). No step times: those need the device."""
    runs = sorted((json.loads(Path(f).read_text()) for f in paths), key=lambda r: r["config"]["depth"])
    (d1, d2), (run1, run2) = [r["config"]["depth"] for r in runs], runs

    def same(r):
        return r["config"]["c"], r["side"], r["rank"], [(x["mode"], x["grad_checkpoint"], x["batch"]) for x in r["rows"]]
    if d1 == d2 or same(run1) != same(run2):
        raise SystemExit(f"error: --scale: runs at depths {d1} and {d2}, width {run1['config']['c']} and "
                         f"{run2['config']['c']}, side {run1['side']} and {run2['side']}, rank {run1['rank']} and "
                         f"{run2['rank']}; expected two depths of one width, side, rank and set of rows")
    cfg = dataclasses.replace(cfg, c=run1["config"]["c"], nhead=run1["config"]["nhead"])
    state = {mode: state_mib(build(cfg, mode, run1["rank"], "meta")) for mode in ("full", "lora")}
    def key(r):
        return r["mode"], r["grad_checkpoint"], r["batch"]

    slope = {key(b): (b["saved_mib"] - a["saved_mib"]) / (d2 - d1) for a, b in zip(run1["rows"], run2["rows"])}
    rows = []
    for a, b in zip(run1["rows"], run2["rows"]):
        row = {k: a[k] for k in ("mode", "grad_checkpoint", "batch", "latent")}
        kept = a["saved_mib"] + (cfg.depth - d1) * slope[key(a)]
        if row["grad_checkpoint"]:
            kept += slope[row["mode"], False, row["batch"]]
        row.update(state_mib=state[row["mode"]], kept_mib=kept, peak_mib=state[row["mode"]] + kept)
        rows.append(row)
    return rows


def table(rows) -> str:
    out = []
    for r in rows:
        head = [r["mode"], "yes" if r["grad_checkpoint"] else "no", r["batch"], r["latent"]]
        if "error" in r:
            out.append(head + [r["error"], "", "", "", "", ""])
        else:
            out.append(head + [f"{r['trainable_M']:.1f}", f"{r['state_mib']:,.0f}", f"{r['saved_mib']:,.0f}",
                               f"{r['peak_mib']:,.0f}", f"{r['step_ms']:,.0f}", f"{r['samples_per_s']:.2f}"])
    return markdown_table(["train", "grad checkpoint", "batch", "latent", "trained M", "state MiB",
                           "kept for backward MiB", "peak MiB", "step ms", "samples/s"], out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--preset", default="paper", choices=["paper", "small"])
    p.add_argument("--depth", type=int, default=None, help="fewer blocks than the preset's (CPU runs)")
    p.add_argument("--c", type=int, default=None, help="another width than the preset's (CPU runs)")
    p.add_argument("--side", type=int, default=1024, help="image side the semantic latent is for")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (diffengine's Würstchen config: 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, as train.py")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="runs/bench/bench_finetune.json")
    p.add_argument("--scale", nargs=2, metavar="JSON", help="scale two runs at two depths up to the preset's depth\n"
                   "(or to --depth)")
    args = p.parse_args(argv)
    if args.scale:
        cfg = stage_c.PRESETS[args.preset]
        rows = scale(args.scale, cfg if args.depth is None else dataclasses.replace(cfg, depth=args.depth))
        text = markdown_table(
            ["train", "grad checkpoint", "batch", "latent", "state MiB", "kept for backward MiB",
             "state + kept MiB"],
            [[r["mode"], "yes" if r["grad_checkpoint"] else "no", r["batch"], r["latent"], f"{r['state_mib']:,.0f}",
              f"{r['kept_mib']:,.0f}", f"{r['peak_mib']:,.0f}"] for r in rows])
        print(text)
        write_json(args.json, {"scaled_from": args.scale, "depth": cfg.depth, "rows": rows})
        Path(args.json).with_suffix(".md").write_text(text + "\n")
        return
    device = start(args, "bench_finetune.py", argv if argv is not None else sys.argv[1:])
    cfg = stage_c.PRESETS[args.preset]
    if args.depth is not None:
        cfg = dataclasses.replace(cfg, depth=args.depth)
    if args.c is not None:                        # heads of the released width, 64 (1536 / 24)
        cfg = dataclasses.replace(cfg, c=args.c, nhead=max(1, args.c // 64))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    rows = []
    for mode in ("full", "lora"):
        for checkpoint in (False, True):
            for batch in args.batch:
                r = bench_row(cfg, args.side, batch, mode, checkpoint, args, device, autocast)
                rows.append(r)
                print(f"[{mode}, checkpoint {checkpoint}, batch {batch}] " +
                      (r.get("error") or f"{r['step_ms']:.0f} ms, peak {r['peak_mib']:,.0f} MiB"), flush=True)
    text = table(rows)
    print(text)
    write_json(args.json, {"machine": machine(), "command": args.command, "threads": args.threads,
                           "config": dataclasses.asdict(cfg), "side": args.side, "precision": args.precision,
                           "rank": args.rank, "when": time.strftime("%Y-%m-%d"), "rows": rows})
    Path(args.json).with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
