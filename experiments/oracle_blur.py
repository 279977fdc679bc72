"""Usage:
    python experiments/oracle_blur.py --run weights/shapes --n 200

How much softness each oracle of experiments/evaluate.py forgives: single-object accuracy of real renders blurred
by a Gaussian of σ pixels, beside Stage A's reconstructions, with each set's PSNR against the real images. It tells
a decoder that the oracle cannot read apart from one that draws the wrong shape: if a blur that leaves the shapes
plain to the eye, at a PSNR above Stage A's, already costs an oracle shapes, that oracle measures sharpness rather
than shape. (It found the analytic oracle reading blurred stars as crosses:
docs/shipped.md#the-analytic-oracle-reads-shapes-by-their-symmetry.)
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import evaluate as ev   # noqa: E402  (the repository root must be on the path first)
from checkpoints import load_stage, run_paths  # noqa: E402


def misreads(scenes, requests) -> str:
    """The shapes of one-object prompts that the main object was read as instead, most common first."""
    wrong = Counter()
    for scene, request in zip(scenes, requests):
        if len(request.objects) == 1 and scene.objects:
            seen = max(scene.objects, key=lambda o: (o.area, o.confidence)).shape    # the main object, as scored
            if seen != request.objects[0].shape:
                wrong[f"{request.objects[0].shape} → {seen}"] += 1
    return ", ".join(f"{pair} ×{n}" for pair, n in wrong.most_common(3)) or "none"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--run", default="weights/shapes", help="folder with the Stage A checkpoint")
    p.add_argument("--n", type=ev.positive_int, default=200, help="prompts, as in evaluate.py (seed EVAL_SEED)")
    p.add_argument("--sigmas", default="0,0.5,0.7,1,1.2", help="blur widths in pixels, comma-separated")
    p.add_argument("--cache-dir", default="runs/oracle_cache", help="where evaluate.py keeps its CNN oracle")
    args = p.parse_args(argv)
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
        if any(not np.isfinite(s) or s < 0 for s in sigmas):
            raise ValueError
    except ValueError:
        p.error(f"--sigmas {args.sigmas!r}: expected numbers ≥ 0, comma-separated")
    try:
        vqgan = load_stage("a", run_paths(Path(args.run), {"a": None}, stages="a")["a"], "cpu", "ema")
    except ValueError as e:
        raise SystemExit(f"error: {e}")

    real, samples = ev.render_with_truth(ev.EVAL_SEED, args.n, 64, exclude=ev.HELD_OUT_PAIRS)
    requests = [ev.parse_caption(s.caption) for s in samples]
    with torch.inference_mode():
        recon = vqgan.decode(vqgan.encode(real)).float().clamp(0, 1)
    sets = [(f"real, blurred σ = {s:g} px", ev.gaussian_blur(real, s)) for s in sigmas]
    sets.append(("Stage A reconstructions", recon))
    oracles = {"analytic": ev.AnalyticDetector(64),
               "CNN": ev.load_or_train_oracle(64, ev.OracleConfig(), Path(args.cache_dir), print)}
    counts = ev.bootstrap_counts(args.n, 1000, seed=1)
    print("\n| images | PSNR dB vs real | single object, analytic | single object, CNN | analytic misreads |\n"
          "|---|---|---|---|---|")
    for name, images in sets:
        scenes = {oracle_name: oracle(images) for oracle_name, oracle in oracles.items()}   # each read once
        cells = [ev._cell(ev.bootstrap_mean(ev.score_images(lambda _: seen, images, requests)["single object"][:, 0],
                                            counts)) for seen in scenes.values()]
        psnr = float(ev.psnr(images, real).mean())          # psnr() clamps: identical images give 100 dB
        print(f"| {name} | {'–' if psnr >= 100 else f'{psnr:.1f}'} | {cells[0]} | {cells[1]} | "
              f"{misreads(scenes['analytic'], requests)} |")


if __name__ == "__main__":
    main()
