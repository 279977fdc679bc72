"""Reading and checking weights: what every stage file, train.py, sample.py and the scripts share, as schedule.py is
shared by Stages B and C.

- Safe reading: `.safetensors`, or a `.pt` read with `torch.load(weights_only=True)`, so that no code stored in a
  file can run; diffusers model folders (config.json + safetensors, sharded or not).
- Strict loading: every key present, no extra ones, every shape right, or one line that names what is wrong (and
  which stage the file looks like).
- Checksums: the SHA-256 of a file, and the `SHA256SUMS` manifest that guards the shipped weights (weights/shapes/).
- This project's own files: train.py checkpoints and the `.safetensors` files that scripts/export_weights.py
  writes, both of which record their stage and config, rebuilt by `load_stage`.

What each stage's released checkpoints call their keys, and how they map to ours, stays in that stage's file
(`load_pretrained`). Every error here is a ValueError whose message is one line.
"""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model. The message is one line."""


class WeightsError(ValueError):
    """A weight file that is missing or is not the one its manifest names. The message is one line."""


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (torch's can run to dozens), or its type if it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Safe reading
# ----------------------------------------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict:
    """A state dict from a .safetensors file or a .pt read with weights_only=True (no code can run)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for corrupt, truncated or unsafe files
        raise CheckpointError(f"checkpoint {path}: cannot be read safely; corrupt, truncated or not a plain "
                              f"weights file ({first_line(e)})") from None
    if not isinstance(ckpt, dict):          # e.g. a bare tensor: every caller looks keys up in it
        raise CheckpointError(f"checkpoint {path}: holds a {type(ckpt).__name__}; expected a dict of weights")
    return ckpt


def read_diffusers_folder(folder: Path) -> tuple[dict, dict]:
    """(config.json, state dict) of a diffusers model folder, single-file or sharded safetensors."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"checkpoint folder {folder}: expected config.json and safetensors weights")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    try:
        config = json.loads(config_file.read_text())
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
            [p.name for p in folder.glob("*.safetensors")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:   # not JSON, or not the diffusers layout
        raise CheckpointError(f"checkpoint folder {folder}: config.json or its weight index is not valid "
                              f"diffusers JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint folder {folder}: config.json holds no JSON object")
    if not files:
        raise CheckpointError(f"checkpoint folder {folder}: no .safetensors weights next to config.json")
    state = {}
    for name in files:
        state.update(read_checkpoint(folder / name))
    return config, state


def with_saved_fields(config, raw: dict, ours: tuple):
    """`config` (read from a diffusers config.json) with the fields diffusers' class has no place for, where
    scripts/export_diffusers.py recorded them under `_wuerstchen` (diffusers skips keys that start with `_`)."""
    saved = raw.get("_wuerstchen")
    if not isinstance(saved, dict):
        return config
    import dataclasses
    try:
        return dataclasses.replace(config, **{k: as_tuples(v) for k, v in saved.items() if k in ours})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json: its _wuerstchen fields do not build a config ({first_line(e)})") from None


# ----------------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------------
# A key only one stage has, to name the stage a mismatched checkpoint belongs to.
STAGE_MARKERS = {"vquantizer.": "Stage A (VQGAN)", "effnet_mappers.": "Stage B (decoder)",
                 "backbone.": "the semantic compressor", "cond_mapper.": "Stage C (prior)"}


def load_strict(model: nn.Module, state: dict, what: str, source: Path):
    """load_state_dict that fails with one line naming missing/unexpected keys or the first shape mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        found = {name for marker, name in STAGE_MARKERS.items() if any(k.startswith(marker) for k in state)}
        hint = f" (it looks like {', '.join(sorted(found))})" if found and what not in found else ""
        parts = [f"{len(missing)} missing keys, e.g. {missing[:3]}" if missing else "",
                 f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}" if unexpected else "",
                 f"{len(wrong)} shape mismatches, e.g. {wrong[0]}" if wrong else ""]
        raise CheckpointError(f"checkpoint {source} does not fit {what}{hint}: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# Checksums and the manifest of the shipped weights (weights/shapes/ and weights/emoji/)
# ----------------------------------------------------------------------------------------------------------------
SHIPPED = (Path(__file__).parent / "weights" / "shapes").resolve()          # the default of sample.py and notebooks
SHIPPED_EMOJI = (Path(__file__).parent / "weights" / "emoji").resolve()
MANIFEST = "SHA256SUMS"           # `sha256sum` format: "<hex>  <file name>" per line; `sha256sum -c` reads it too


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder) -> dict:
    """{file name: SHA-256} from FOLDER/SHA256SUMS, or {} if there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror if isinstance(e, OSError) else e.reason}); "
                           f"expected '<SHA-256>  <file>' lines") from None
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise WeightsError(f"{path}, line {number}: {line.strip()[:60]!r}; expected '<64 hex digits>  <file>'")
        entries[parts[1].lstrip("*")] = parts[0].lower()
    return entries


def verify_weights(folder, names=None):
    """Checks the files that FOLDER/SHA256SUMS lists (or only `names`, where listed) before any of them loads: a
    missing, truncated or altered file is one line naming it and the SHA-256 it should have. The shipped folder
    must have its manifest."""
    folder = Path(folder)
    manifest, shipped = read_manifest(folder), folder.resolve() in (SHIPPED, SHIPPED_EMOJI)
    if not manifest and shipped:
        raise WeightsError(f"{folder / MANIFEST}: missing; the shipped weights are checked against it "
                           f"(git checkout -- {folder} restores the folder)")
    for name in names or ():
        if shipped and name not in manifest:
            raise WeightsError(f"{folder / name}: not listed in {folder / MANIFEST}; expected one of "
                               f"{', '.join(sorted(manifest))}")
    for name, expected in manifest.items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"{path}: missing; expected the file with SHA-256 {expected}")
        try:
            actual = file_sha256(path)
        except OSError as e:
            raise WeightsError(f"{path}: cannot be read ({e.strerror}); expected the file with SHA-256 "
                               f"{expected}") from None
        if actual != expected:
            raise WeightsError(f"{path}: damaged or altered ({path.stat().st_size:,} bytes, SHA-256 {actual[:12]}…); "
                               f"expected SHA-256 {expected}")


# ----------------------------------------------------------------------------------------------------------------
# This project's files: train.py checkpoints and exported .safetensors, rebuilt from the config they record
# ----------------------------------------------------------------------------------------------------------------
METADATA_KEY = "wuerstchen"       # the one metadata entry of an exported file: safetensors writes a metadata map of
                                  # several keys in a random order, which would change the file's SHA-256 per export


def as_tuples(value):
    """JSON turns a config's tuples into lists; back into tuples, nested ones too (a frozen dataclass hashes them)."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def exported_info(path) -> dict | None:
    """What export_weights.py recorded in a .safetensors file (stage, config, text encoder, image size), or None
    for other safetensors files (a diffusers model's). Reads only the header."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception:                     # unreadable: read_checkpoint says why, in one line
        metadata = {}
    if METADATA_KEY not in metadata:
        return None
    try:
        info = json.loads(metadata[METADATA_KEY])
    except ValueError:
        info = None
    kinds = {"stage": str, "config": dict, "image_size": int, "text_encoder": (str, type(None)),
             "text_length": (int, type(None))}
    if not isinstance(info, dict) or not all(isinstance(info.get(k), t) for k, t in kinds.items()):
        raise WeightsError(f"{path}: its '{METADATA_KEY}' metadata is not what scripts/export_weights.py writes; "
                           f"expected a JSON object with {', '.join(kinds)}")
    return info


def run_paths(run, given: dict | None = None, stages: str = "abc") -> dict:
    """{stage: checkpoint path} for `stages` of a run folder: given[stage] where set, else RUN/stage_x.pt
    (train.py's), else RUN/stage_x.safetensors (exported, as in weights/shapes/). The exported files among them are
    checked against the folder's SHA256SUMS, all before the first loads, so that a damaged one stops the run before
    any stage is built."""
    run, given = Path(run), given or {}
    listed, paths = read_manifest(run), {}
    for s in stages:
        if given.get(s):
            paths[s] = Path(given[s])
            continue
        pt, exported = run / f"stage_{s}.pt", run / f"stage_{s}.safetensors"
        if pt.exists() and exported.exists():
            raise WeightsError(f"{run} holds both {pt.name} and {exported.name}; expected one Stage {s.upper()}")
        paths[s] = exported if not pt.exists() and (exported.exists() or exported.name in listed) else pt
    chosen = [paths[s].name for s in stages if not given.get(s) and paths[s].suffix == ".safetensors"]
    if chosen:                            # every file this run will load, before the first of them loads
        verify_weights(run, chosen)
    return paths


def stage_parts(stage: str):
    """(module, config class, model class) of Stage A, B or C. The stage files are imported here, when a stage is
    loaded, because they import this module: importing them at the top would be circular."""
    import stage_a, stage_b, stage_c  # noqa: E401
    return {"a": (stage_a, stage_a.StageAConfig, stage_a.StageA), "b": (stage_b, stage_b.StageBConfig, stage_b.StageB),
            "c": (stage_c, stage_c.StageCConfig, stage_c.Prior)}[stage]


def load_stage(stage: str, path, device="cpu", weights: str = "ema"):
    """Stage A → StageA, B → StageB (compressor + decoder), C → Prior, in eval mode.

    A train.py checkpoint (it records its stage and config) gives its EMA weights by default; a .safetensors file
    that export_weights.py wrote (weights/shapes/) gives the EMA weights it holds, after its SHA-256 is checked
    against the SHA256SUMS beside it; anything else goes to the stage's `load_pretrained`, which reads the official
    .pt files and diffusers folders.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        ckpt = read_checkpoint(path)
        if "stage" in ckpt and "config" in ckpt:                          # written by train.py
            if ckpt.get("lora"):
                raise CheckpointError(f"checkpoint {path} holds the LoRA adapters of a --lora-rank run only; "
                                      f"expected its base weights ({ckpt.get('init')}), with the adapters in "
                                      f"{path.parent / 'stage_c_lora.safetensors'} (sample.py --lora)")
            if not isinstance(ckpt.get(weights), dict) or not isinstance(ckpt["config"], dict):
                raise CheckpointError(f"checkpoint {path}: a train.py checkpoint without its '{weights}' weights "
                                      f"or config; expected both (damaged or edited by hand?)")
            return build_stage(stage, path, ckpt["stage"], ckpt["config"], ckpt[weights], weights,
                               (ckpt.get("text_encoder"), ckpt.get("text_length")),
                               ckpt.get("train", {}).get("image_size")).to(device).eval()
        del ckpt                                  # an official .pt: free it before load_pretrained reads it again
    if path.suffix == ".safetensors":
        verify_weights(path.parent, [path.name])   # against the SHA256SUMS beside it, before a byte of it is used
    if path.suffix == ".safetensors" and (info := exported_info(path)) is not None:
        if weights != "ema":
            raise CheckpointError(f"checkpoint {path}: an exported file holds the EMA weights only; "
                                  f"expected --weights ema")
        return build_stage(stage, path, info.get("stage"), info.get("config"), read_checkpoint(path), "ema",
                           (info.get("text_encoder"), info.get("text_length")),
                           info.get("image_size")).to(device).eval()
    return stage_parts(stage)[0].load_pretrained(path, device=device)


def build_stage(stage: str, path: Path, saved_stage, config, state: dict, weights: str, text_encoder_spec,
                train_side):
    """The model of a train.py checkpoint or an exported file: its config, its weights loaded strictly."""
    _, config_class, model_class = stage_parts(stage)
    if saved_stage != stage:
        raise CheckpointError(f"checkpoint {path} is a stage {str(saved_stage).upper()} checkpoint; "
                              f"expected stage {stage.upper()}")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: its config is a {type(config).__name__}; expected a dict")
    try:
        model = model_class(config_class(**{k: as_tuples(v) for k, v in config.items()}))
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: its config does not build a Stage {stage.upper()} "
                              f"({first_line(e)})") from None
    load_strict(model, state, f"stage {stage.upper()} ({weights} weights)", path)
    model.text_encoder_spec = tuple(text_encoder_spec)
    model.train_side = train_side
    return model
