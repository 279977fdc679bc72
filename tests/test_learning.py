"""Each stage's own loss falls clearly when it overfits one fixed batch at the tiny preset (CPU, seconds).

The generator is re-seeded every step, so t, the noise and the dropout draws are the same each step: the objective
is a fixed function of the weights, and a working model + loss must drive it down.
"""
import torch

import stage_a
import stage_b
import stage_c


def overfit(model, loss_fn, steps: int, lr: float, part: str | None = None) -> list[float]:
    """Loss per step (or one of its parts) while AdamW fits one batch."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, parts = loss_fn(torch.Generator().manual_seed(123))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((parts[part] if part else loss).item())
    return losses


def smooth_images(n: int, side: int, seed: int) -> torch.Tensor:
    """Low-frequency colour fields in [0, 1]: learnable at the tiny preset, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def assert_falls(losses: list[float], factor: float):
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert last < factor * first, f"loss went {first:.4f} → {last:.4f}; expected below {factor} × start"


def test_stage_a_overfits_one_batch():
    torch.manual_seed(0)
    model = stage_a.StageA(stage_a.PRESETS["tiny"])
    images = smooth_images(4, 32, seed=1)
    # The VQ terms fall slowly (the codebook starts within ±1/K of 0 and moves by gradient); the reconstruction
    # must fall fast.
    assert_falls(overfit(model, lambda g: model.loss(images), steps=40, lr=2e-3, part="mse"), 0.2)


def test_stage_a_adversarial_term_switches_on_after_warmup():
    torch.manual_seed(0)
    cfg = stage_a.PRESETS["tiny"]
    model, disc = stage_a.StageA(cfg), stage_a.Discriminator(cfg)
    images = smooth_images(2, 64, seed=2)
    off, before = model.loss(images, disc, step=cfg.adversarial_start - 1)
    on, after = model.loss(images, disc, step=cfg.adversarial_start)
    assert "adversarial" not in before and "adversarial" in after
    torch.testing.assert_close(on - off, cfg.adversarial_weight * after["adversarial"])
    d_loss = stage_a.discriminator_loss(disc, images, after["recon"])
    d_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_stage_b_overfits_one_batch():
    torch.manual_seed(0)
    model = stage_b.StageB(stage_b.PRESETS["tiny"])
    images = smooth_images(4, 64, seed=3)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    text = torch.randn(4, 8, 384, generator=torch.Generator().manual_seed(5))
    uncond = torch.zeros(1, 8, 384)
    losses = overfit(model, lambda g: model.loss(latents, images, text, uncond, generator=g), steps=60, lr=2e-3)
    assert_falls(losses, 0.5)


def test_stage_b_trains_the_compressor_jointly():
    model = stage_b.StageB(stage_b.PRESETS["tiny"])
    images = smooth_images(2, 64, seed=3)
    loss, _ = model.loss(torch.randn(2, 4, 16, 16), images, torch.randn(2, 8, 384), torch.zeros(1, 8, 384),
                         semantic_dropout=0.0, generator=torch.Generator().manual_seed(0))
    # At init the decoder head is zero and ε̂ = x_t·const, so first give the head weights to carry gradient back.
    loss.backward()
    assert model.decoder.clf[1].weight.grad.abs().sum() > 0
    torch.nn.init.normal_(model.decoder.clf[1].weight, std=0.02)
    model.zero_grad()
    loss, _ = model.loss(torch.randn(2, 4, 16, 16), images, torch.randn(2, 8, 384), torch.zeros(1, 8, 384),
                         semantic_dropout=0.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.compressor.backbone[0][0].weight.grad.abs().sum() > 0


def test_stage_c_overfits_one_batch():
    torch.manual_seed(0)
    model = stage_c.Prior(stage_c.PRESETS["tiny"])
    semantic = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(6))
    text = torch.randn(4, 8, 384, generator=torch.Generator().manual_seed(7))
    uncond = torch.zeros(1, 8, 384)
    losses = overfit(model, lambda g: model.loss(semantic, text, uncond, generator=g), steps=60, lr=2e-3)
    assert_falls(losses, 0.5)


def test_caption_dropout_replaces_text_with_the_empty_caption():
    """With dropout 1 every caption becomes the unconditional one, so the text no longer matters."""
    model = stage_c.Prior(stage_c.PRESETS["tiny"]).eval()
    torch.nn.init.normal_(model.out[1].weight, std=0.02)
    semantic, uncond = torch.randn(2, 16, 4, 4), torch.randn(1, 8, 384)
    a, _ = model.loss(semantic, torch.randn(2, 8, 384), uncond, caption_dropout=1.0,
                      generator=torch.Generator().manual_seed(0))
    b, _ = model.loss(semantic, torch.randn(2, 8, 384), uncond, caption_dropout=1.0,
                      generator=torch.Generator().manual_seed(0))
    c, _ = model.loss(semantic, torch.randn(2, 8, 384), uncond, caption_dropout=0.0,
                      generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item() and a.item() != c.item()


def test_token_convolutions_mix_each_caption_token_with_its_neighbours_only():
    """StageCConfig.text_conv: with k layers, the conditioning at token i depends on tokens i − k … i + k, and on no
    others; with none (as released) each token's conditioning is its own."""
    text = torch.randn(1, 12, 384, generator=torch.Generator().manual_seed(8))
    edited = text.clone()
    edited[0, 6] += 1.0                                                   # change token 6 only

    def changed_tokens(text_conv: int) -> list[int]:
        torch.manual_seed(0)
        model = stage_c.Prior(stage_c.StageCConfig(c=32, c_cond=384, c_r=16, depth=1, nhead=2, text_conv=text_conv))
        for block in model.token_convs:                                   # they start as the identity
            torch.nn.init.normal_(block.conv.weight, std=0.1)
        with torch.no_grad():
            a, b = (model.condition(x)["text_kv"][0][0] for x in (text, edited))   # the caption's keys, (1, L, c)
        return torch.nonzero((a - b).abs().amax(dim=-1)[0] > 1e-6).flatten().tolist()

    assert changed_tokens(0) == [6]
    assert changed_tokens(1) == [5, 6, 7]
    assert changed_tokens(2) == [4, 5, 6, 7, 8]
