"""LoRA: low-rank adapters on the prior's linear layers, for fine-tuning the released Stage C on one GPU.

Hu et al. 2021 (arXiv 2106.09685): to adapt a trained linear layer y = W x, keep W frozen and learn a low-rank
change ΔW = (α / r) · B A, with A: (r, in) and B: (out, r), r much smaller than in and out. B starts at zero, so
the adapted model starts exactly where the released one is; only A and B train, so an adapter of the 1B prior at
r = 8 on its attention projections holds 4 · 32 · 2 · 8 · 1536 ≈ 3.1M numbers (12.6 MB in fp32) instead of 1B.
After training, ΔW can be added into W ("merged"): the adapted model then costs what the released one does.

Which layers. diffusers' Würstchen LoRA example targets the prior's attention projections, which stage_c.py names
as the released model does in diffusers (`blocks.{i}.attention.to_q`, `to_k`, `to_v`, `to_out.0`). `--lora-targets
linear` also adapts the other linear layers: each ResBlock's MLP, the attention blocks' text mapper and the caption
mapper. Convolutions (the input projection, the depthwise convs, the head) stay as released.

The file. An adapter is saved in the layout diffusers reads with `WuerstchenPriorPipeline.load_lora_weights` and
writes with `save_lora_weights`: safetensors keys `prior.<module>.lora_A.weight` and `prior.<module>.lora_B.weight`,
and peft's LoraConfig (r, lora_alpha, target_modules) as JSON in the header's `lora_adapter_metadata`, its keys
prefixed `prior.`. So a LoRA trained here loads in diffusers, and one trained there loads here, without converting.
Files that diffusers' training scripts write name the two matrices `lora.down` (A) and `lora.up` (B) and carry no
metadata, so α = r; they are read too.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from checkpoints import CheckpointError, first_line

PREFIX = "prior."                     # diffusers' WuerstchenPriorPipeline.unet_name, before every key
METADATA_KEY = "lora_adapter_metadata"  # where diffusers and peft keep the LoraConfig in a safetensors header
TARGETS = ("attention", "linear")
# The key endings a LoRA file may use: peft's (what save_lora writes), and diffusers' own names for the same two
# matrices, which its training scripts write when they pass peft's weights through convert_state_dict_to_diffusers.
SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
            ".lora.down.weight": "lora_A", ".lora.up.weight": "lora_B"}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank change: y = W x + b + (α / r) · B(A(x)).

    `lora_A` and `lora_B` are peft's names, so that the state-dict keys are the ones diffusers reads. `scale`
    multiplies the change at use (sample.py --lora FILE:SCALE), on top of α / r.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale = base, rank, float(alpha), 1.0
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        # peft's default: A as nn.Linear initialises itself (Kaiming-uniform, a = √5), B at zero, so ΔW = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged_from = None       # after merge(keep=True): the base weight as it was, for an exact unmerge
        self.merged = False

    @property
    def factor(self) -> float:
        return self.alpha / self.rank * self.scale

    def delta(self) -> torch.Tensor:
        """ΔW = (α / r) · scale · B A, (out, in), in float32 whatever the weights' dtype."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.factor

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(x)) * self.factor

    @torch.no_grad()
    def merge(self, keep: bool = True):
        """W ← W + ΔW. With keep, the old W is kept aside, so that unmerge gives it back bit for bit (subtracting
        ΔW again would not: floating-point addition does not undo exactly)."""
        if self.merged:
            return
        weight = self.base.weight
        self.merged_from = weight.detach().clone() if keep else None
        weight.copy_((weight.float() + self.delta()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self.merged_from is None:
            raise ValueError("unmerge: this adapter was merged with keep=False, so its base weight is gone; "
                             "expected merge(keep=True)")
        self.base.weight.copy_(self.merged_from)
        self.merged_from, self.merged = None, False


# ----------------------------------------------------------------------------------------------------------------
# Wrapping a model
# ----------------------------------------------------------------------------------------------------------------
def target_names(model: nn.Module, targets: str = "attention") -> list[str]:
    """The names of the nn.Linear layers that `targets` adapts, in module order: 'attention' for the attention
    projections (to_q, to_k, to_v, to_out.0, as diffusers' Würstchen LoRA example), 'linear' for every nn.Linear
    (the projections, the MLPs, the text and key/value mappers)."""
    if targets not in TARGETS:
        raise ValueError(f"LoRA targets {targets!r}: expected one of {', '.join(TARGETS)}")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in f".{name}":
            continue
        if targets == "linear" or name.rsplit(".", 2)[-2:-1] == ["attention"] or name.endswith("attention.to_out.0"):
            names.append(name)
    return names


def add_lora(model: nn.Module, names, rank, alpha) -> nn.Module:
    """Wraps the named nn.Linear layers in LoRALinear and freezes every other parameter. `rank` and `alpha` are one
    number each, or a {name: number} dict (a file read back can have a rank per layer)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA: {name} is a {type(base).__name__}; expected an nn.Linear")
        r = rank[name] if isinstance(rank, dict) else rank
        a = alpha[name] if isinstance(alpha, dict) else alpha
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"LoRA rank {r!r} for {name}: expected a positive integer")
        setattr(parent, child, LoRALinear(base, r, a))
    return model


def adapters(model: nn.Module) -> dict:
    """{name: LoRALinear} of a wrapped model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module, keep: bool = True):
    for m in adapters(model).values():
        m.merge(keep)


def unmerge(model: nn.Module):
    for m in adapters(model).values():
        m.unmerge()


def strip(state: dict) -> dict:
    """A wrapped model's state dict with the base weights under their unwrapped names (`to_q.base.weight` →
    `to_q.weight`) and no adapters: what the plain model loads."""
    return {k.replace(".base.", "."): v for k, v in state.items() if ".lora_" not in k}


# ----------------------------------------------------------------------------------------------------------------
# The file: diffusers' layout
# ----------------------------------------------------------------------------------------------------------------
def lora_state(model: nn.Module) -> tuple[dict, dict]:
    """(tensors, metadata) of a wrapped model's adapters, in the layout diffusers reads (see the module note)."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters to save")
    tensors = {}
    for name, m in found.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    ranks = {name: m.rank for name, m in found.items()}
    alphas = {name: m.alpha for name, m in found.items()}
    r, alpha = max(set(ranks.values()), key=list(ranks.values()).count), next(iter(alphas.values()))
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(found), "lora_dropout": 0.0, "bias": "none",
              "init_lora_weights": True, "use_dora": False,
              "rank_pattern": {n: v for n, v in ranks.items() if v != r},
              "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}
    return tensors, {METADATA_KEY: json.dumps({PREFIX + k: v for k, v in config.items()}, sort_keys=True)}


def save_lora(model: nn.Module, path):
    """Writes the adapters only, atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file
    tensors, metadata = lora_state(model)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def lora_file(path) -> Path:
    """The LoRA file at `path`, or the one .safetensors file in the folder at `path` (as save_lora_weights writes)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"LoRA folder {path}: expected one .safetensors file, found {len(files)}")
        path = files[0]
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path}: no such file")
    return path


def read_lora(path) -> tuple[dict, dict, dict]:
    """({module: (A, B)}, {module: rank}, {module: alpha}) from a LoRA file in diffusers' layout (ours, or one that
    diffusers' save_lora_weights or peft wrote, with or without the `prior.` prefix). Without metadata, α = r: peft's
    default, and what diffusers assumes for a file that gives no alphas."""
    from safetensors import safe_open
    path = lora_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:            # safetensors raises several types for a damaged or foreign file
        raise CheckpointError(f"LoRA file {path}: not a readable safetensors file ({first_line(e)})") from None
    pairs = {}
    for key, value in tensors.items():
        # peft's own state dicts name the adapter too: "<module>.lora_A.default.weight".
        name = key.removeprefix(PREFIX).removeprefix("base_model.model.").replace(".default.weight", ".weight")
        for suffix, kind in SUFFIXES.items():
            if name.endswith(suffix):
                pairs.setdefault(name[:-len(suffix)], {})[kind] = value
                break
        else:
            raise CheckpointError(f"LoRA file {path}: key {key!r} is not a LoRA weight; expected "
                                  f"'{PREFIX}<module>.lora_A.weight' and '.lora_B.weight' keys (or diffusers' "
                                  f"'.lora.down.weight' and '.lora.up.weight')")
    if not pairs:
        raise CheckpointError(f"LoRA file {path}: holds no LoRA weights")
    for name, kinds in pairs.items():
        if set(kinds) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"LoRA file {path}: {name} has {sorted(kinds)} only; expected lora_A and lora_B")
        A, B = kinds["lora_A"], kinds["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"LoRA file {path}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                                  f"expected (r, in) and (out, r)")
    try:
        config = json.loads(metadata.get(METADATA_KEY) or "{}")
    except ValueError:
        raise CheckpointError(f"LoRA file {path}: its {METADATA_KEY} is not JSON") from None
    config = {k.removeprefix(PREFIX): v for k, v in config.items()} if isinstance(config, dict) else {}
    ranks = {name: kinds["lora_A"].shape[0] for name, kinds in pairs.items()}
    for name, r in ranks.items():
        expected = (config.get("rank_pattern") or {}).get(name, config.get("r", r))
        if expected != r:
            raise CheckpointError(f"LoRA file {path}: {name} has rank {r} but its metadata says r = {expected}")
    alpha_pattern = config.get("alpha_pattern") or {}
    alphas = {name: float(alpha_pattern.get(name, config.get("lora_alpha", r))) for name, r in ranks.items()}
    return {n: (k["lora_A"], k["lora_B"]) for n, k in pairs.items()}, ranks, alphas


def apply_lora(model: nn.Module, path, scale: float = 1.0, merge_weights: bool = True) -> nn.Module:
    """Reads a LoRA file and applies it to `model` (a Prior): wrapped, loaded, scaled, and by default merged into
    the weights without keeping the old ones (sampling never unmerges). A file made for another model is one line."""
    weights, ranks, alphas = read_lora(path)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(weights) - linears)
    if unknown:
        raise CheckpointError(f"LoRA file {path}: adapts {len(unknown)} layers this prior does not have, e.g. "
                              f"{unknown[0]!r}; expected a LoRA of this model (depth {getattr(model.config, 'depth', '?')})")
    for name, (A, B) in weights.items():
        layer = model.get_submodule(name)
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
            raise CheckpointError(f"LoRA file {path}: {name} maps {A.shape[1]} → {B.shape[0]} features but the "
                                  f"prior's layer maps {layer.in_features} → {layer.out_features}; expected a LoRA "
                                  f"of a prior of this width")
    add_lora(model, list(weights), ranks, alphas)
    for name, (A, B) in weights.items():
        m = model.get_submodule(name)
        m.lora_A.weight.data.copy_(A)
        m.lora_B.weight.data.copy_(B)
        m.scale = scale
    if merge_weights:
        merge(model, keep=False)
    return model
