"""Usage:
    python scripts/export_diffusers.py --run weights/shapes --to exported/ --stages ab
    python scripts/export_diffusers.py --stage-c runs/mine/stage_c.pt --to exported/
    python scripts/export_diffusers.py --lora runs/mine/stage_c_lora.safetensors --to exported/

Write Stages A, B and C as diffusers model folders (config.json + diffusion_pytorch_model.safetensors), named as
in the released pipelines: `vqgan/` (PaellaVQModel), `decoder/` (WuerstchenDiffNeXt), `prior/` (WuerstchenPrior).
Each loads with the class's `from_pretrained(folder)`, and here with `--stage-x folder` or `--init folder`.

- Our parameter names are diffusers' already (stage_a/b/c.py load its folders unrenamed), so the weights are written
  as they are; only the config is translated.
- What diffusers cannot hold is refused in one line naming the field: a prior with caption-token convolutions
  (`text_conv` > 0: the tiny and emoji presets), whose weights diffusers' WuerstchenPrior would have nowhere to put.
- What diffusers keeps outside the model goes in config.json under `_wuerstchen`, which diffusers skips (it
  ignores keys that start with `_`): the prior's latent shift and scale (the prior pipeline's `latent_std` and
  `latent_mean`: for the released prior 1 and 42), Stage B's compressor table and the sampling sizes. Our loaders
  read them back, so a folder written here reloads exactly. Stage B's semantic compressor is not in diffusers'
  decoder (its pipelines never run it): it is left out, and said so.
- `--lora FILE` copies a LoRA as `prior_lora/pytorch_lora_weights.safetensors`, the name diffusers' save_lora_weights
  uses: our LoRA files are already in diffusers' layout (lora.py), so this only checks and renames.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoints import first_line, load_stage, run_paths  # noqa: E402  (the project's root, added above)

DIFFUSERS_VERSION = "0.42.1"          # the version the round trip is tested with (tests/test_finetune.py)
FOLDERS = {"a": ("vqgan", "PaellaVQModel"), "b": ("decoder", "WuerstchenDiffNeXt"), "c": ("prior", "WuerstchenPrior")}


class Unrepresentable(ValueError):
    """A config that diffusers' class cannot hold. One line, naming the field."""


def diffusers_config(stage: str, cfg) -> dict:
    """The diffusers class's config.json fields for our config (the inverse of stage_x.config_from_diffusers)."""
    if stage == "a":
        return {"in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2, "levels": cfg.levels,
                "bottleneck_blocks": cfg.bottleneck_blocks, "embed_dim": cfg.c_hidden,
                "latent_channels": cfg.c_latent, "num_vq_embeddings": cfg.codebook_size,
                "scale_factor": cfg.scale_factor}
    if stage == "b":
        return {"c_in": cfg.c_in, "c_out": cfg.c_in, "c_r": cfg.c_r, "patch_size": cfg.patch_size,
                "c_cond": cfg.c_cond, "c_hidden": list(cfg.c_hidden),
                "nhead": [h if a else -1 for h, a in zip(cfg.nhead, cfg.attention)],   # released: -1, no attention
                "blocks": list(cfg.blocks), "level_config": ["CTA" if a else "CT" for a in cfg.attention],
                "inject_effnet": list(cfg.inject_semantic), "effnet_embd": cfg.c_semantic, "clip_embd": cfg.c_text,
                "kernel_size": cfg.kernel_size, "dropout": cfg.dropout}
    if cfg.text_conv:
        raise Unrepresentable(f"Stage C text_conv={cfg.text_conv}: diffusers' WuerstchenPrior has no caption-token "
                              f"convolutions; expected text_conv=0 (the paper and small presets)")
    return {"c_in": cfg.c_in, "c": cfg.c, "c_cond": cfg.c_cond, "c_r": cfg.c_r, "depth": cfg.depth,
            "nhead": cfg.nhead, "dropout": cfg.dropout}


def export_stage(stage: str, model, folder: Path) -> dict:
    """One model → a diffusers folder, each file written to a temporary name first, then renamed."""
    name, class_name = FOLDERS[stage]
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION,
              **diffusers_config(stage, model.config), "_wuerstchen": dataclasses.asdict(model.config)}
    state = model.decoder.state_dict() if stage == "b" else model.state_dict()
    tensors = {k: v.detach().float().contiguous().clone() for k, v in sorted(state.items())}
    folder.mkdir(parents=True, exist_ok=True)
    for file, write in (("diffusion_pytorch_model.safetensors", lambda p: save_file(tensors, str(p),
                                                                                      metadata={"format": "pt"})),
                        ("config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))):
        tmp = folder / f".{file}.tmp"
        write(tmp)
        os.replace(tmp, folder / file)
    return config


def export_lora(path: Path, to: Path) -> Path:
    import lora
    weights, ranks, _ = lora.read_lora(path)                     # a damaged or foreign file stops here, in one line
    target = to / "prior_lora" / "pytorch_lora_weights.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lora.lora_file(path), target)                # a folder holds one file, which read_lora read
    print(f"{target}: {len(weights)} adapted layers, rank {max(ranks.values())}")
    return target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default=None, help="a run folder (train.py's stage_x.pt or exported .safetensors)")
    for s in "abc":
        p.add_argument(f"--stage-{s}", default=None, help=f"Stage {s.upper()} weights (instead of RUN's)")
    p.add_argument("--stages", default=None, help="which stages, e.g. 'ab' (default: those given, or all of RUN)")
    p.add_argument("--lora", default=None, help="a Stage C LoRA file to copy into diffusers' file name")
    p.add_argument("--to", required=True, help="folder for vqgan/, decoder/, prior/ (and prior_lora/)")
    args = p.parse_args(argv)
    given = {s: getattr(args, f"stage_{s}") for s in "abc"}
    stages = args.stages or ("abc" if args.run else "".join(s for s in "abc" if given[s]))
    if not stages and not args.lora:
        p.error("nothing to export: pass --run, --stage-a/b/c or --lora")
    to = Path(args.to)
    try:
        paths = run_paths(Path(args.run or "."), given, stages) if stages else {}
        for s in stages:
            model = load_stage(s, paths[s])
            folder = to / FOLDERS[s][0]
            export_stage(s, model, folder)
            note = " (its semantic compressor is not part of diffusers' decoder: left out)" if s == "b" else ""
            print(f"{folder}: {FOLDERS[s][1]} from {paths[s]}{note}")
        if args.lora:
            export_lora(Path(args.lora), to)
    except ValueError as e:               # our loaders' and Unrepresentable's messages are one line
        raise SystemExit(f"error: {first_line(e)}")


if __name__ == "__main__":
    main()
