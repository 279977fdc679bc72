"""Usage:
    python scripts/export_weights.py --run runs/shipped --to weights/shapes

Export a train.py run's EMA weights as safetensors files with a SHA256SUMS manifest: the shipped weights' format.

Each stage becomes `stage_x.safetensors`: its EMA weights as trained (fp32) and one metadata entry
(checkpoints.METADATA_KEY) with what checkpoints.load_stage needs to rebuild the model (stage, config, text encoder,
training image size). Only weights are kept, not the optimizer or the discriminator, so the files are small and load with
no code run. Each stage's JSONL training log is copied beside its file. The same run gives the same bytes: tensors
are written in name order and the metadata as sorted JSON. Once the manifest is written, each file is loaded as
sample.py loads it and compared with the checkpoint's EMA weights.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402  (the project's root, added above)
from checkpoints import MANIFEST, METADATA_KEY, file_sha256, load_stage, read_checkpoint  # noqa: E402


def export_stage(stage: str, checkpoint: Path, target: Path) -> None:
    """One train.py checkpoint's EMA weights → TARGET (.safetensors), written atomically."""
    model = load_stage(stage, checkpoint)                    # checks that the checkpoint builds its model
    info = {"stage": stage, "config": dataclasses.asdict(model.config),
            "step": int(read_checkpoint(checkpoint).get("step", 0)),
            "text_encoder": model.text_encoder_spec[0], "text_length": model.text_encoder_spec[1],
            "image_size": model.train_side}
    # clone(): safetensors refuses tensors that share storage, which a state dict's views can
    tensors = {name: value.detach().contiguous().clone() for name, value in sorted(model.state_dict().items())}
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
    os.replace(tmp, target)


def check_export(stage: str, checkpoint: Path, target: Path) -> None:
    """The exported file, loaded as sample.py loads it (SHA-256 checked), holds exactly the checkpoint's EMA."""
    ema = read_checkpoint(checkpoint)["ema"]
    loaded = load_stage(stage, target).state_dict()
    if loaded.keys() != ema.keys():
        raise SystemExit(f"error: {target}: its tensors are not those of {checkpoint}'s EMA weights")
    for name, value in ema.items():
        if loaded[name].dtype != value.dtype or not torch.equal(loaded[name], value):
            raise SystemExit(f"error: {target}: {name} differs from {checkpoint}'s EMA weights after export")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--run", default="runs/shipped", help="folder with train.py's stage_a/b/c.pt")
    p.add_argument("--to", default=str(checkpoints.SHIPPED), help="folder to write the .safetensors files and SHA256SUMS")
    p.add_argument("--stages", default="abc", choices=["a", "ab", "abc"], help="which stages to export (default all)")
    args = p.parse_args(argv)
    run, to = Path(args.run), Path(args.to)
    to.mkdir(parents=True, exist_ok=True)
    (to / MANIFEST).unlink(missing_ok=True)       # stale hashes must not vouch for the new files while they change
    lines = []
    for stage in args.stages:
        target = to / f"stage_{stage}.safetensors"
        try:
            export_stage(stage, run / f"stage_{stage}.pt", target)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        lines.append(f"{file_sha256(target)}  {target.name}")
        log = run / f"stage_{stage}.log.jsonl"         # the training curve, for the notebooks; it holds wall times,
        if log.exists():                                # so it is not bit-reproducible and not in the manifest
            shutil.copyfile(log, to / log.name)
        print(f"{target}: {target.stat().st_size:,} bytes, SHA-256 {lines[-1].split()[0]}")
    tmp = to / f".{MANIFEST}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, to / MANIFEST)
    for stage in args.stages:                     # after the manifest: the check that sample.py makes runs too
        try:
            check_export(stage, run / f"stage_{stage}.pt", to / f"stage_{stage}.safetensors")
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    print(f"manifest: {to / MANIFEST}")


if __name__ == "__main__":
    main()
