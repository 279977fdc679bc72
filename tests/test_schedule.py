"""The shared schedule: closed-form values, and bit-identity with diffusers' DDPMWuerstchenScheduler."""
import math

import pytest
import torch

import schedule as S


def closed_form_alpha_bar(t: float) -> float:
    s = 0.008
    v = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(v, 1e-4), 0.9999)


@pytest.mark.parametrize("t, expected", [(0.5, 0.4938), (2 / 3, 0.2464), (0.9, 0.0241), (1.0, 1e-4), (0.0, 0.9999)])
def test_alpha_bar_check_values(t, expected):
    assert S.alpha_bar(torch.tensor([t])).item() == pytest.approx(expected, abs=5e-5)


def test_alpha_bar_matches_closed_form_everywhere():
    ts = torch.linspace(0, 1, 101)
    ours = S.alpha_bar(ts)
    ref = torch.tensor([closed_form_alpha_bar(t) for t in ts.tolist()])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert bool((ours[1:] <= ours[:-1]).all()), "ᾱ must fall monotonically with t"


def test_add_noise_closed_form():
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    a = torch.tensor([closed_form_alpha_bar(v) for v in t.tolist()]).view(4, 1, 1, 1)
    torch.testing.assert_close(S.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_sample_t_stretch():
    t = S.sample_t(200_000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 1.0
    # (1 − u)·1.08 + 0.001 ≥ 1 ⇔ u ≤ 0.001/1.08 + 0.08/1.08 ≈ 7.5% of samples clamped to exactly 1.
    assert (t == 1.0).float().mean().item() == pytest.approx(0.081 / 1.08, abs=0.003)


def test_p2_weight_is_one_minus_alpha_bar():
    t = torch.linspace(0.001, 1, 50)
    torch.testing.assert_close(S.p2_weight(t), 1 - S.alpha_bar(t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [8, 9, 64])
def test_timestep_embedding_closed_form(dim):
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = S.timestep_embedding(t, dim)
    half = dim // 2
    for i, tv in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-k * math.log(10000) / (half - 1))
            assert emb[i, k].item() == pytest.approx(math.sin(tv * 10000 * f), abs=2e-3)
            assert emb[i, half + k].item() == pytest.approx(math.cos(tv * 10000 * f), abs=2e-3)
    if dim % 2:
        assert bool((emb[:, -1] == 0).all())


def test_timestep_lists():
    assert torch.equal(S.linear_timesteps(12), torch.linspace(1, 0, 13))
    ts = S.STAGE_C_TIMESTEPS
    assert ts.numel() == 30 and ts[0] == 1 and ts[-1] == 0
    assert ts[19].item() == pytest.approx(2 / 3) and bool((ts[1:] < ts[:-1]).all())
    # Dense at high noise: 19 intervals above 2/3, 10 below.
    assert (ts[:20].diff().abs().mean() < ts[19:].diff().abs().mean()).item()


@pytest.mark.parametrize("bad", [[1.0], [0.0, 1.0], [1.0, 1.0, 0.0], [1.5, 0.0], [1.0, float("nan")], []])
def test_check_timesteps_rejects(bad):
    with pytest.raises(ValueError, match="timesteps"):
        S.check_timesteps(bad)


def test_ddpm_step_adds_no_noise_on_the_last_step():
    x, eps, z = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t, zero = torch.full((2,), 0.1), torch.zeros(2)
    assert torch.equal(S.ddpm_step(x, eps, t, zero, z), S.ddpm_step(x, eps, t, zero, torch.zeros_like(z)))
    half = torch.full((2,), 0.05)
    assert not torch.equal(S.ddpm_step(x, eps, t, half, z), S.ddpm_step(x, eps, t, half, torch.zeros_like(z)))


def test_ddpm_step_recovers_x0_with_the_true_noise():
    """With the exact ε, one step from t to 0 lands on √ᾱ(0)·x0 plus the small ε left by the clamp ᾱ(0) = 0.9999:
    μ = √ᾱ₀·x0 + (α − ᾱ)/(√(1−ᾱ)·√α)·ε with α = ᾱ/ᾱ₀ (substitute x_t into the step's mean)."""
    x0, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.full((3,), 0.6)
    out = S.ddpm_step(S.add_noise(x0, noise, t), noise, t, torch.zeros(3), torch.randn_like(x0))
    a, a0 = closed_form_alpha_bar(0.6), 0.9999
    alpha = a / a0
    expected = math.sqrt(a0) * x0 + (alpha - a) / (math.sqrt(1 - a) * math.sqrt(alpha)) * noise
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Parity with diffusers' DDPMWuerstchenScheduler: identical tensors, not merely close ones.
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def scheduler():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMWuerstchenScheduler()


def test_alpha_bar_and_add_noise_identical_to_diffusers(scheduler):
    t = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(S.alpha_bar(t), scheduler._alpha_cumprod(t, "cpu"))
    x0, noise = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    assert torch.equal(S.add_noise(x0, noise, t[:8]), scheduler.add_noise(x0, noise, t[:8]))


def test_stage_c_timesteps_identical_to_diffusers():
    wuerstchen = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")
    assert torch.equal(S.STAGE_C_TIMESTEPS, torch.Tensor(wuerstchen.DEFAULT_STAGE_C_TIMESTEPS))


@pytest.mark.parametrize("timesteps", [S.STAGE_C_TIMESTEPS, S.linear_timesteps(12), [1.0, 0.7, 0.2, 0.0]])
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sampling_loop_identical_to_diffusers(scheduler, timesteps, guidance):
    """A fixed nonlinear 'model' driven through our loop and through the scheduler's loop, same generator."""
    shape = (2, 3, 4, 4)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))

    def model(x, t, cond):
        return torch.tanh(torch.einsum("bchw,cd->bdhw", x, w) * t.view(-1, 1, 1, 1)) + cond.view(-1, 1, 1, 1)

    cond, uncond = torch.tensor([0.3, -0.2]), torch.tensor([0.0, 0.0])
    ours = S.sample(model, shape, cond={"cond": cond}, uncond={"cond": uncond}, guidance=guidance,
                    timesteps=timesteps, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    scheduler.set_timesteps(timesteps=timesteps if isinstance(timesteps, torch.Tensor) else list(timesteps))
    x = torch.randn(shape, generator=g)
    for t in scheduler.timesteps[:-1]:
        t_b = t.expand(shape[0])
        if guidance > 1:
            e_c, e_u = model(torch.cat([x, x]), torch.cat([t_b, t_b]), torch.cat([cond, uncond])).chunk(2)
            eps = torch.lerp(e_u, e_c, guidance)
        else:
            eps = model(x, t_b, cond)
        x = scheduler.step(eps, t_b, x, generator=g).prev_sample
    assert torch.equal(ours, x)
