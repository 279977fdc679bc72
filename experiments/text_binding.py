"""Usage:
    python experiments/text_binding.py

How much a caption token of the offline text encoder (all-MiniLM-L6-v2) knows of the words around it. For captions
"a {colour1} {shape1} left of a {colour2} {shape2}", each layer's state of the shape1 token is split by ANOVA: the
share of its variance that its own word explains, and the shares that its colour word and the other object's words
explain. Stage C's attention never lets caption tokens mix (stage_c.py), so a shape token that carries almost only
its own word leaves "which colour goes with which shape" to the prior, which is why the tiny preset mixes neighbouring
tokens first (StageCConfig.text_conv).
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import COLOURS, SHAPES  # noqa: E402  (the repository root must be on the path first)
from text import TextEncoder     # noqa: E402


def variance_share(states: np.ndarray, labels: list[str]) -> float:
    """Share of the variance of states (N, D) that the group means of `labels` explain (between / total)."""
    labels = np.array(labels)
    centred = states - states.mean(0)
    between = np.zeros_like(states)
    for value in np.unique(labels):
        between[labels == value] = centred[labels == value].mean(0)
    return float((between ** 2).sum() / (centred ** 2).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description="Variance shares of a shape token's states in all-MiniLM-L6-v2.")
    p.add_argument("--captions", type=int, default=600, help="random two-object captions")
    args = p.parse_args(argv)
    if args.captions < 10:
        p.error(f"--captions {args.captions}: expected at least 10")
    rng = random.Random(0)
    words = []
    for _ in range(args.captions):
        c1, c2 = rng.sample(list(COLOURS), 2)
        words.append((c1, rng.choice(SHAPES), c2, rng.choice(SHAPES)))
    captions = [f"a {c1} {s1} left of a {c2} {s2}" for c1, s1, c2, s2 in words]
    encoder = TextEncoder.from_name_or_path("minilm", max_length=16)
    if any(len(encoder.tokenizer.tokenize(w)) != 1 for w in [*COLOURS, *SHAPES]):
        raise SystemExit("error: a colour or shape is more than one token; the token positions below assume one")
    ids, mask = encoder.tokenize(captions)
    with torch.no_grad():
        layers = encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    shape1 = 3                                            # [CLS] a colour1 shape1 left of a colour2 shape2 [SEP]
    print("| layer | own word (shape 1) | its colour word | other shape | other colour |\n|---|---|---|---|---|")
    for i, hidden in enumerate(layers):                   # 0: the embeddings, then the 6 transformer layers
        states = hidden[:, shape1].numpy()                # (N, 384)
        shares = [variance_share(states, [w[k] for w in words]) for k in (1, 0, 3, 2)]
        print(f"| {i} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")


if __name__ == "__main__":
    main()
