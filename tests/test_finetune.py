"""Fine-tuning (issue 23): train.py --init, --grad-checkpoint and --lora-rank, lora.py, sample.py --lora and
scripts/export_diffusers.py, on re-randomised stand-ins of the released prior (its architecture at reduced width
and depth, as the parity tests use), trained on the shipped shapes Stages A and B. No real weights are needed.

- --init from the official .pt layout, a diffusers folder and a train.py checkpoint: the first step's logged loss is
  the loaded model's loss on that batch, and training moves it; a flag that contradicts the weights, or weights of
  another stage, is one line.
- LoRA: only the adapters train (the base stays bit-equal), the file holds only them, merge then unmerge gives the
  weights back bit for bit, a resumed LoRA run continues exactly, and files for another prior are one line.
- With diffusers (and peft): what export_diffusers.py writes loads in diffusers and gives our outputs within 1e-5,
  a LoRA trained here loads with WuerstchenPriorPipeline.load_lora_weights and matches sample.py --lora, and a
  LoRA saved by diffusers/peft loads here and matches.
"""
import contextlib
import copy
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import sample
import stage_a
import stage_b
import stage_c
import train
from checkpoints import CheckpointError, load_stage
from conftest import ROOT, randomize

sys.path.insert(0, str(ROOT / "scripts"))
import export_diffusers  # noqa: E402

SHAPES = ROOT / "weights" / "shapes"
# The released prior's architecture, small: MiniLM's 384-wide tokens, so that the shapes' text encoder drives it.
STAND_IN = stage_c.StageCConfig(c=64, c_cond=384, c_r=32, depth=2, nhead=4, dropout=0.0, semantic_shift=0.0,
                                semantic_scale=1.0)
# No sample grids (--sample-every 0): a grid at the end of each run decodes images that no test here reads; the
# tests of the grids ask for them.
FAST = ["--batch-size", "4", "--log-every", "1", "--save-every", "2", "--sample-every", "0", "--ema-start", "1",
        "--warmup", "1", "--lr-decay", "0", "--no-progress", "--text-length", "16", "--lr", "1e-3"]
TOL = 1e-5


def stand_in(seed=1, config=STAND_IN) -> stage_c.Prior:
    # The head's weights small, so that |1 − b| stays away from 0 (as the parity tests randomise it).
    return randomize(stage_c.Prior(config), seed=seed, scale=0.1, small=("out.",)).eval()


@contextlib.contextmanager
def raises_one_line(exc, match):
    """pytest.raises, and the message is one line."""
    with pytest.raises(exc, match=match) as e:
        yield
    assert "\n" not in str(e.value), f"not one line: {e.value}"


def official_layout(prior: stage_c.Prior) -> dict:
    """The prior's weights as model_v3_stage_c.pt holds them: nn.MultiheadAttention's in_proj and out_proj."""
    state, out = prior.state_dict(), {}
    for k, v in state.items():
        if ".attention.to_q." in k:
            prefix, kind = k.split(".attention.to_q.")
            out[f"{prefix}.attention.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{prefix}.attention.{n}.{kind}"] for n in ("to_q", "to_k", "to_v")])
        elif ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        else:
            out[k.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = v.clone()
    return {"ema_state_dict": out}


@pytest.fixture
def paper_is_stand_in(monkeypatch):
    """The official file implies the paper preset; here it is the stand-in's config (as the parity tests do)."""
    monkeypatch.setitem(stage_c.PRESETS, "paper", STAND_IN)


@pytest.fixture
def run_folder(tmp_path):
    """A run folder with the shipped shapes Stages A and B, which Stage C trains on."""
    out = tmp_path / "run"
    out.mkdir()
    for s in "ab":
        (out / f"stage_{s}.safetensors").write_bytes((SHAPES / f"stage_{s}.safetensors").read_bytes())
    return out


def init_weights(kind: str, folder) -> str:
    """The stand-in saved as `kind`: the official .pt layout, a diffusers folder or a train.py checkpoint."""
    prior = stand_in()
    if kind == "official":
        torch.save(official_layout(prior), folder / "model_v3_stage_c.pt")
        return str(folder / "model_v3_stage_c.pt")
    if kind == "diffusers":
        export_diffusers.export_stage("c", prior, folder / "prior")
        return str(folder / "prior")
    # Its raw weights differ from its EMA, which a run starts from.
    torch.save({"stage": "c", "config": dict(vars(STAND_IN)), "model": stand_in(seed=9).state_dict(),
                "ema": prior.state_dict(), "step": 7}, folder / "earlier.pt")
    return str(folder / "earlier.pt")


def first_losses(out) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "stage_c.log.jsonl").read_text().splitlines())}


def loss_of(path: str, argv: list, stage: str = "c") -> float:
    """The loss that train.py's first step computes, for the model loaded from `path`: the same batch, frozen
    features and noise (train.main's set-up, by hand)."""
    args, model_cfg, cfg = train.parse_args(argv)
    torch.manual_seed(args.seed)
    batches = train.Batches(args.data, args.seed, cfg, 0, 1)
    model = load_stage(stage, path).train()
    task = train.TASKS[stage](args, model.config, cfg, torch.device("cpu"), train.Path(args.out), batches)
    images, captions, indices = batches(0)
    with torch.no_grad():
        loss, _ = task.loss(train.LossModule(model), images, captions, indices,
                            train.step_generator(args.seed, 0, 0, torch.device("cpu")), 0)
    return loss.item()


# ----------------------------------------------------------------------------------------------------------------
# --init and --grad-checkpoint
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["official", "diffusers", "checkpoint"])
def test_init_starts_from_the_loaded_model(kind, tmp_path, run_folder, paper_is_stand_in):
    path = init_weights(kind, tmp_path)
    argv = ["--stage", "c", "--out", str(run_folder), "--init", path, "--steps", "3", *FAST]
    train.main(argv)
    logged = first_losses(run_folder)
    assert logged[1] == pytest.approx(loss_of(path, argv), rel=1e-6, abs=1e-7)
    assert logged[1] != logged[3], "three steps did not move the loss"
    ckpt = torch.load(run_folder / "stage_c.pt", weights_only=True)
    assert ckpt["config"] == dict(vars(STAND_IN)) and ckpt["init"] == path
    start = stand_in().state_dict()
    assert any(not torch.equal(ckpt["model"][k], start[k]) for k in start), "the weights did not train"
    train.main(argv + ["--steps", "4", "--resume"])        # the same command resumes, --init and all
    ckpt = torch.load(run_folder / "stage_c.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["init"] == path


def test_init_stage_b_from_exported_weights(run_folder):
    """Stage B starts from weights too (here the shipped shapes' own, decoder and compressor)."""
    (run_folder / "stage_b.safetensors").unlink()                # Stage B is what trains; only A is frozen
    path = str(SHAPES / "stage_b.safetensors")
    argv = ["--stage", "b", "--out", str(run_folder), "--init", path, "--steps", "2", *FAST]
    train.main(argv)
    logged = {r["step"]: r["loss"] for r in map(json.loads, (run_folder / "stage_b.log.jsonl").read_text().splitlines())}
    assert logged[1] == pytest.approx(loss_of(path, argv, "b"), rel=1e-6, abs=1e-7)
    with pytest.raises(SystemExit, match="a folder, but Stage B starts from a file"):
        train.main(argv[:4] + ["--init", str(run_folder)] + argv[6:])


def test_init_from_scratch_differs(tmp_path, run_folder, paper_is_stand_in):
    """The comparison above can fail: a fresh model's first loss is not the loaded one's."""
    path = init_weights("official", tmp_path)
    argv = ["--stage", "c", "--out", str(run_folder), "--steps", "1", *FAST, *sum(
        ([f"--{k.replace('_', '-')}", str(v)] for k, v in vars(STAND_IN).items() if k in ("c", "depth")), [])]
    train.main(argv)
    assert first_losses(run_folder)[1] != pytest.approx(loss_of(path, argv + ["--init", path]), rel=1e-6)


def test_init_bad_input_is_one_line(tmp_path, run_folder, paper_is_stand_in, capsys):
    path = init_weights("official", tmp_path)
    base = ["--stage", "c", "--out", str(run_folder), "--steps", "1", *FAST]
    with raises_one_line(SystemExit, r"--c 128: --init .* has c=64; drop the flag"):
        train.main(base + ["--init", path, "--c", "128"])
    with raises_one_line(SystemExit, r"is a stage B checkpoint; expected stage C|expected an 'ema_state_dict'"):
        train.main(base + ["--init", str(SHAPES / "stage_b.safetensors")])
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "a", "--out", str(run_folder), "--init", path])
    assert "expected --stage b or c" in capsys.readouterr().err and e.value.code == 2


def test_stage_c_grids_use_stage_b_text_encoder(tmp_path, run_folder):
    """The released prior and decoder read different CLIP towers (ViT-bigG, ViT-H). Here a 24-wide CLIP drives
    Stage C and the shapes' Stage B reads MiniLM's 384-wide tokens: without --text-encoder-b the run stops at once in
    one line; with it, the final sample grid decodes."""
    from test_text import TEXT_CONFIG, _tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel
    clip = tmp_path / "clip"
    CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).save_pretrained(clip / "text_encoder")
    _tokenizer(tmp_path).save_pretrained(clip / "tokenizer")
    argv = ["--stage", "c", "--out", str(run_folder), "--steps", "1", *FAST, "--sample-every", "1000",
            "--c-cond", "24", "--text-encoder", str(clip)]
    with pytest.raises(SystemExit, match="reads 384-wide caption tokens but --text-encoder .* gives 24-wide ones; "
                                         "expected --text-encoder-b"):
        train.main(argv)
    # Named as --text-encoder-b, an encoder of the wrong width is blamed on that flag, even if it is --text-encoder.
    with raises_one_line(SystemExit, "--text-encoder-b .* gives 24-wide tokens; expected the 384-wide ones"):
        train.main(argv + ["--text-encoder-b", str(clip)])
    train.main(argv + ["--text-encoder-b", "minilm"])
    assert (run_folder / "stage_c_000001.png").is_file()


def test_stage_c_grids_give_stage_b_its_own_caption_length(run_folder):
    """Stage B decodes the grids from captions as long as those it was trained on (its checkpoint says 32 tokens),
    whatever --text-length Stage C reads; at the same length the two share one encoder."""
    stored = load_stage("b", SHAPES / "stage_b.safetensors").text_encoder_spec[1]
    for length, shared in ((16, False), (stored, True)):
        argv = ["--stage", "c", "--out", str(run_folder), *FAST, "--sample-every", "1000",
                "--text-length", str(length)]
        args, model_cfg, cfg = train.parse_args(argv)
        task = train.TaskC(args, model_cfg, cfg, torch.device("cpu"), run_folder,
                           train.Batches(args.data, 0, cfg, 0, 1))
        assert task.text.max_length == length and task.text_b.max_length == stored
        assert (task.text_b is task.text) == shared


def test_stage_c_without_grids_keeps_only_what_its_loss_needs(tmp_path, run_folder):
    """--sample-every 0: no grids, and Stage A, the decoder and Stage B's text encoder are not kept."""
    argv = ["--stage", "c", "--out", str(run_folder), "--steps", "1", *FAST]
    args, model_cfg, cfg = train.parse_args(argv)
    task = train.TaskC(args, model_cfg, cfg, torch.device("cpu"), run_folder, train.Batches(args.data, 0, cfg, 0, 1))
    stage_b_model = load_stage("b", SHAPES / "stage_b.safetensors")
    assert task.decoder is None and task.vqgan is None
    assert {id(m) for m in task.frozen} == {id(task.compressor), id(task.text.model)}
    assert torch.equal(task.compressor.state_dict()["backbone.0.0.weight"],
                       stage_b_model.compressor.state_dict()["backbone.0.0.weight"])
    train.main(argv)
    assert (run_folder / "stage_c.pt").is_file() and not list(run_folder.glob("stage_c_*.png"))
    # The same seed trains the same weights with grids or without.
    with_grids = tmp_path / "grids"
    with_grids.mkdir()
    for s in "ab":
        (with_grids / f"stage_{s}.safetensors").write_bytes((run_folder / f"stage_{s}.safetensors").read_bytes())
    train.main(argv[:3] + [str(with_grids)] + argv[4:] + ["--sample-every", "1000"])
    assert list(with_grids.glob("stage_c_*.png")), "the run meant to draw grids drew none"
    a, b = (torch.load(f / "stage_c.pt", weights_only=True)["model"] for f in (run_folder, with_grids))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("with_lora", [False, True])
def test_grad_checkpoint_gives_the_same_gradients(with_lora):
    """Also with LoRA, where no block's input needs a gradient (the base is frozen up to the first adapter)."""
    prior = stand_in(config=stage_c.StageCConfig(**{**vars(STAND_IN), "dropout": 0.1})).train()
    if with_lora:
        lora.add_lora(prior, lora.target_names(prior), 4, 4.0)
    trained = [p for p in prior.parameters() if p.requires_grad]
    x, text = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 384)

    def grads(checkpointed):
        prior.zero_grad(set_to_none=True)
        prior.grad_checkpoint = checkpointed
        torch.manual_seed(5)                          # dropout's draws; the recomputation repeats them
        loss, _ = prior.loss(x, text, text[:1], generator=torch.Generator().manual_seed(3))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert any(g.abs().sum() > 0 for g in g1)      # (a fresh adapter's A gets none: its B is 0)


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------
def adapted(rank=4, alpha=8.0, targets="attention", seed=2) -> stage_c.Prior:
    prior = stand_in()
    lora.add_lora(prior, lora.target_names(prior, targets), rank, alpha)
    g = torch.Generator().manual_seed(seed)
    for m in lora.adapters(prior).values():          # B starts at 0; trained adapters do not
        m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return prior


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 384, generator=g)


def test_lora_targets_start_as_the_base_and_merge_exactly():
    base = stand_in()
    names = lora.target_names(base, "attention")
    assert names == [f"blocks.{3 * i + 2}.attention.{n}" for i in range(2) for n in ("to_q", "to_k", "to_v", "to_out.0")]
    assert len(lora.target_names(base, "linear")) > len(names)
    fresh = copy.deepcopy(base)
    lora.add_lora(fresh, names, 4, 4.0)
    x, t, text = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, text), base(x, t, text)), "a fresh adapter (B = 0) must change nothing"
        prior = adapted()
        before = {k: v.clone() for k, v in prior.state_dict().items()}
        y = prior(x, t, text)
        assert (y - base(x, t, text)).abs().max() > 1e-3
        lora.merge(prior)
        assert (prior(x, t, text) - y).abs().max() <= TOL * max(1, y.abs().max())
        assert any(not torch.equal(before[k], v) for k, v in prior.state_dict().items()), "merge changed nothing"
        lora.unmerge(prior)
    assert all(torch.equal(before[k], v) for k, v in prior.state_dict().items()), "unmerge is not exact"


def test_lora_file_round_trip(tmp_path):
    prior = adapted(rank=4, alpha=8.0)
    lora.save_lora(prior, tmp_path / "l.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()[lora.METADATA_KEY])
    assert all(k.startswith("prior.blocks.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert len(keys) == 16 and meta["prior.r"] == 4 and meta["prior.lora_alpha"] == 8.0
    total = sum(p.numel() for p in stand_in().parameters())
    assert sum(p.numel() for m in lora.adapters(prior).values() for p in (m.lora_A.weight, m.lora_B.weight)) < total / 10
    x, t, text = inputs()
    loaded = lora.apply_lora(stand_in(), tmp_path / "l.safetensors")
    half = lora.apply_lora(stand_in(), tmp_path / "l.safetensors", scale=0.5, merge_weights=False)
    with torch.no_grad():
        halved = copy.deepcopy(prior)                                      # scale 0.5 is half the α
        for m in lora.adapters(halved).values():
            m.alpha /= 2
        y, y_half = prior(x, t, text), halved(x, t, text)
        assert (loaded(x, t, text) - y).abs().max() <= TOL * max(1, y.abs().max())
        assert (half(x, t, text) - y_half).abs().max() <= TOL * max(1, y_half.abs().max())
        assert (y_half - y).abs().max() > 1e-3


def test_lora_bad_files_are_one_line(tmp_path):
    lora.save_lora(adapted(), tmp_path / "ok.safetensors")
    deeper = stand_in(config=stage_c.StageCConfig(**{**vars(STAND_IN), "depth": 3}))
    lora.add_lora(deeper, lora.target_names(deeper), 4, 4.0)
    lora.save_lora(deeper, tmp_path / "deeper.safetensors")
    with raises_one_line(CheckpointError, "adapts 4 layers this prior does not have"):
        lora.apply_lora(stand_in(), tmp_path / "deeper.safetensors")
    wider = stand_in(config=stage_c.StageCConfig(**{**vars(STAND_IN), "c": 128}))
    with raises_one_line(CheckpointError, r"maps 64 → 64 features but the prior's layer maps 128 → 128"):
        lora.apply_lora(wider, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "ok.safetensors"))
    save_file(tensors, str(tmp_path / "rank.safetensors"),
              metadata={lora.METADATA_KEY: json.dumps({"prior.r": 8, "prior.lora_alpha": 8})})
    with raises_one_line(CheckpointError, "has rank 4 but its metadata says r = 8"):
        lora.read_lora(tmp_path / "rank.safetensors")
    save_file({**tensors, "prior.blocks.0.depthwise.weight": torch.zeros(1)}, str(tmp_path / "full.safetensors"))
    with raises_one_line(CheckpointError, "is not a LoRA weight"):
        lora.read_lora(tmp_path / "full.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with raises_one_line(CheckpointError, "not a readable safetensors file"):
        lora.read_lora(tmp_path / "junk.safetensors")


def test_lora_run_trains_only_the_adapters(tmp_path, run_folder, paper_is_stand_in, monkeypatch):
    path = init_weights("official", tmp_path)
    wrapped = []
    add = lora.add_lora
    monkeypatch.setattr(train.lora, "add_lora", lambda model, *a: wrapped.append(model) or add(model, *a))
    argv = ["--stage", "c", "--out", str(run_folder), "--init", path, "--lora-rank", "2", "--lora-alpha", "4",
            *FAST]
    train.main(argv + ["--steps", "4"])
    model = wrapped[0]
    start = stand_in().state_dict()
    assert lora.strip(model.state_dict()).keys() == start.keys()
    assert all(torch.equal(v, start[k]) for k, v in lora.strip(model.state_dict()).items()), "a base weight moved"
    assert all(m.lora_B.weight.abs().sum() > 0 for m in lora.adapters(model).values()), "an adapter did not train"
    ckpt = torch.load(run_folder / "stage_c.pt", weights_only=True)
    assert ckpt["lora"] == {"rank": 2, "alpha": 4.0, "targets": "attention"}
    assert ckpt["model"].keys() == ckpt["ema"].keys() and all(".lora_" in k for k in ckpt["model"])
    file = run_folder / "stage_c_lora.safetensors"
    assert file.stat().st_size < 20_000 and len(lora.read_lora(file)[0]) == 8
    with pytest.raises(SystemExit, match="holds the LoRA adapters of a --lora-rank run only"):
        sample.main(["a red circle", "--run", str(run_folder), "--out", str(tmp_path / "s")])
    # Resumed from step 2, the curve continues exactly.
    again = tmp_path / "again"
    again.mkdir()
    for s in "ab":
        (again / f"stage_{s}.safetensors").write_bytes((run_folder / f"stage_{s}.safetensors").read_bytes())
    resumed = argv[:3] + [str(again)] + argv[4:]
    train.main(resumed + ["--steps", "2"])
    train.main(resumed + ["--steps", "4", "--resume"])
    assert first_losses(again) == first_losses(run_folder)
    a, b = (torch.load(f / "stage_c.pt", weights_only=True) for f in (run_folder, again))
    assert all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])
    (w1, r1, a1), (w2, r2, a2) = lora.read_lora(file), lora.read_lora(again / "stage_c_lora.safetensors")
    assert (r1, a1) == (r2, a2) and all(torch.equal(x, y) for n in w1 for x, y in zip(w1[n], w2[n]))
    with pytest.raises(SystemExit, match="trains adapters with rank 2; expected --lora-rank 2 or none"):
        train.main(["--stage", "c", "--out", str(again), "--lora-rank", "3", "--resume", "--steps", "5", *FAST])
    with pytest.raises(SystemExit, match="trains adapters with alpha 4.0; expected --lora-alpha 4.0 or none"):
        train.main(["--stage", "c", "--out", str(again), "--lora-rank", "2", "--lora-alpha", "2", "--resume", *FAST])
    with pytest.raises(SystemExit, match="with --resume: the run in .* started from .*; expected that or no --init"):
        train.main(["--stage", "c", "--out", str(again), "--init", str(SHAPES / "stage_c.safetensors"), "--resume",
                    *FAST])
    # A run may not start from its own checkpoint: the first save would overwrite its base.
    with pytest.raises(SystemExit, match="is this run's own checkpoint, which its first save would overwrite"):
        train.main(argv[:3] + [str(again), "--init", str(again / "stage_c.pt")] + argv[6:] + ["--steps", "1"])


def test_lora_ema_shares_the_frozen_base():
    """A LoRA run's EMA holds its own adapters but the model's frozen base, not a second copy of the prior."""
    prior = adapted()
    ema = train.make_ema(prior)
    pairs = list(zip(prior.named_parameters(), ema.parameters()))
    assert all((e is p) == (".lora_" not in name) for (name, p), e in pairs)
    assert all(torch.equal(e, p) for (_, p), e in pairs) and not any(e.requires_grad for e in ema.parameters())
    plain = stand_in().train()
    assert not any(e is p for e, p in zip(train.make_ema(plain).parameters(), plain.parameters()))


def test_lora_needs_stage_c_and_init(run_folder, capsys):
    with pytest.raises(SystemExit):
        train.main(["--stage", "c", "--out", str(run_folder), "--lora-rank", "4"])
    assert "expected --stage c with --init PATH" in capsys.readouterr().err


def test_sample_applies_a_lora(tmp_path, run_folder, paper_is_stand_in, capsys):
    path = init_weights("official", tmp_path)
    lora.save_lora(adapted(rank=4, alpha=32.0), tmp_path / "l.safetensors")
    common = ["a red circle", "--run", str(run_folder), "--stage-c", path, "--text-encoder-c", "minilm",
              "--size", "64", "--prior-steps", "4", "--decoder-steps", "4"]

    def image(*extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        sample.main(common + ["--out", str(out), *extra])
        return torch.from_numpy(np.asarray(Image.open(out / "000_a_red_circle.png"), dtype=np.float32))

    plain = image()
    assert torch.equal(image("--lora", f"{tmp_path / 'l.safetensors'}:0"), plain)
    assert (image("--lora", str(tmp_path / "l.safetensors")) - plain).abs().max() > 0
    with pytest.raises(SystemExit):
        sample.parse_args(["x", "--lora", f"{tmp_path / 'missing.safetensors'}:big"])
    assert "expected FILE or FILE:SCALE with a number for SCALE" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# scripts/export_diffusers.py, and with diffusers itself
# ----------------------------------------------------------------------------------------------------------------
def test_export_refuses_what_diffusers_cannot_hold(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"text_conv=2: diffusers' WuerstchenPrior has no caption-token"):
        export_diffusers.main(["--run", str(SHAPES), "--stages", "c", "--to", str(tmp_path)])


def test_export_reloads_here_exactly(tmp_path):
    export_diffusers.main(["--run", str(SHAPES), "--stages", "ab", "--to", str(tmp_path)])
    for s, folder in (("a", "vqgan"), ("b", "decoder")):
        ours, back = load_stage(s, SHAPES / f"stage_{s}.safetensors"), load_stage(s, tmp_path / folder)
        assert back.config == ours.config
        mine = ours.decoder.state_dict() if s == "b" else ours.state_dict()
        theirs = back.decoder.state_dict() if s == "b" else back.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items())
    prior = stand_in()
    export_diffusers.export_stage("c", prior, tmp_path / "prior")
    back = stage_c.load_pretrained(tmp_path / "prior")
    assert back.config == STAND_IN and all(torch.equal(v, back.state_dict()[k]) for k, v in prior.state_dict().items())


@pytest.fixture(scope="module")
def dw():
    return pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")


def close(ours, ref, what):
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), f"{what}: max |ours − diffusers| = {err:.3e}"


def test_diffusers_loads_the_export(dw, tmp_path):
    export_diffusers.main(["--run", str(SHAPES), "--stages", "ab", "--to", str(tmp_path)])
    prior = stand_in()
    export_diffusers.export_stage("c", prior, tmp_path / "prior")
    vq = dw.PaellaVQModel.from_pretrained(tmp_path / "vqgan").eval()
    decoder = dw.WuerstchenDiffNeXt.from_pretrained(tmp_path / "decoder").eval()
    ref_prior = dw.WuerstchenPrior.from_pretrained(tmp_path / "prior").eval()
    a, b = load_stage("a", SHAPES / "stage_a.safetensors"), load_stage("b", SHAPES / "stage_b.safetensors")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = torch.rand(2, 3, 64, 64, generator=g)
        close(a.encode(images), vq.encode(images).latents / vq.config.scale_factor, "Stage A encode")
        latents = torch.randn(2, 4, 16, 16, generator=g)
        close(a.decode(latents), vq.decode(latents * vq.config.scale_factor).sample, "Stage A decode")
        semantic, text, t = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 5, 384, generator=g), torch.rand(2)
        close(b.decoder(latents, t, semantic, text), decoder(latents, t, semantic, text), "Stage B decoder")
        x, t, text = inputs()
        close(prior(x, t, text), ref_prior(x, t, text), "Stage C prior")


def test_lora_trades_with_diffusers_both_ways(dw, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    base = stand_in()
    export_diffusers.export_stage("c", base, tmp_path / "prior")
    x, t, text = inputs()
    # Ours → diffusers: the pipeline's load_lora_weights reads the file as train.py writes it, α/r included.
    ours = adapted(rank=4, alpha=8.0)
    lora.save_lora(ours, tmp_path / "ours.safetensors")
    export_diffusers.main(["--lora", str(tmp_path / "ours.safetensors"), "--to", str(tmp_path / "x")])
    pipe = dw.WuerstchenPriorPipeline(tokenizer=None, text_encoder=None, scheduler=None,
                                      prior=dw.WuerstchenPrior.from_pretrained(tmp_path / "prior").eval())
    pipe.load_lora_weights(str(tmp_path / "x" / "prior_lora"))
    sampled = lora.apply_lora(stand_in(), tmp_path / "ours.safetensors")     # what sample.py --lora does
    with torch.no_grad():
        close(sampled(x, t, text), pipe.prior(x, t, text), "our LoRA in diffusers' pipeline")
        assert (pipe.prior(x, t, text) - base(x, t, text)).abs().max() > 1e-3, "the LoRA changed nothing"
    # diffusers/peft → ours: an adapter added with peft, saved with the pipeline's save_lora_weights.
    theirs = dw.WuerstchenPrior.from_pretrained(tmp_path / "prior").eval()
    theirs.add_adapter(peft.LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dw.WuerstchenPriorPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(theirs),
        unet_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
    here = lora.apply_lora(stand_in(), tmp_path / "peft")
    with torch.no_grad():
        close(here(x, t, text), theirs(x, t, text), "diffusers' LoRA here")
    export_diffusers.main(["--lora", str(tmp_path / "peft"), "--to", str(tmp_path / "y")])    # a folder, as written
    assert lora.read_lora(tmp_path / "y" / "prior_lora")[1] == lora.read_lora(tmp_path / "peft")[1]
    # The way diffusers' LoRA training scripts save: peft's weights renamed to diffusers' lora.down / lora.up keys,
    # with no metadata (α = r). Here α = r = 2, so the adapter above would act twice as strongly as it does in diffusers.
    from diffusers.utils import convert_state_dict_to_diffusers
    dw.WuerstchenPriorPipeline.save_lora_weights(
        tmp_path / "script", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(theirs)))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "script" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.endswith(".lora.down.weight") for k in f.keys())
    pipe = dw.WuerstchenPriorPipeline(tokenizer=None, text_encoder=None, scheduler=None,
                                      prior=dw.WuerstchenPrior.from_pretrained(tmp_path / "prior").eval())
    pipe.load_lora_weights(str(tmp_path / "script"))
    here = lora.apply_lora(stand_in(), tmp_path / "script")
    with torch.no_grad():
        close(here(x, t, text), pipe.prior(x, t, text), "diffusers' script-saved LoRA here")
        assert (pipe.prior(x, t, text) - theirs(x, t, text)).abs().max() > 1e-4, "α = r should differ from α = 6"
    # peft's raw state dict names the adapter ("lora_A.default.weight"); with no metadata, α = r as above.
    from safetensors.torch import save_file
    raw = {k: v.contiguous() for k, v in theirs.state_dict().items() if ".lora_" in k}
    assert any(".lora_A.default." in k for k in raw)
    save_file(raw, str(tmp_path / "raw.safetensors"))
    with torch.no_grad():
        close(lora.apply_lora(stand_in(), tmp_path / "raw.safetensors")(x, t, text), pipe.prior(x, t, text),
              "peft's raw keys here")
