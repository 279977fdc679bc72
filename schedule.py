"""The noise schedule, loss weighting and ancestral sampler shared by Stages B and C.

Würstchen (arXiv 2306.00637, Sec. 3 and App. A) trains both diffusion stages in continuous time t in [0, 1]
with the cosine schedule of Nichol & Dhariwal, a p2 loss weight, and samples them with an ancestral DDPM step
between arbitrary consecutive times. Everything here is a pure function of tensors; nothing holds state.

It mirrors the released code (`diffuzz.py` of dome272/Wuerstchen) and diffusers' `DDPMWuerstchenScheduler`,
down to the order of floating-point operations where that order decides the last bit, so that our sampler and
diffusers' produce identical tensors from the same generator.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------------------------
# Cosine schedule
# ----------------------------------------------------------------------------------------------------------------
COSINE_S = 0.008                       # offset s of the cosine schedule, so that ᾱ(0) is not exactly 1
ALPHA_BAR_MIN, ALPHA_BAR_MAX = 1e-4, 0.9999  # released clamp: keeps 1/√(1−ᾱ) and 1/√ᾱ finite at both ends


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """ᾱ(t) = cos²(((t+s)/(1+s))·π/2) / cos²((s/(1+s))·π/2), clamped to [1e-4, 0.9999]. t: (B,) in [0, 1]."""
    # s is a float32 tensor, as in the released scheduler, so that (1 + s) rounds the same way.
    s = torch.tensor(COSINE_S, dtype=torch.float32, device=t.device)
    at_zero = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    return (torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / at_zero).clamp(ALPHA_BAR_MIN, ALPHA_BAR_MAX)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, ...) so it broadcasts against a (B, C, H, W) tensor."""
    return v.view(v.shape[0], *[1] * (like.dim() - 1))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = √ᾱ(t)·x0 + √(1−ᾱ(t))·ε."""
    a = _per_sample(alpha_bar(t), x0)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Training: which t to train on, and how much each t counts
# ----------------------------------------------------------------------------------------------------------------
T_STRETCH, T_MIN = 1.08, 0.001  # released: t = (1 − u)·1.08 + 0.001, clamped, so ~7.5% of samples sit at t = 1


def sample_t(batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times. The stretch past 1 oversamples pure noise, where sampling starts."""
    u = torch.rand(batch, generator=generator, device=device)
    return ((1 - u) * T_STRETCH + T_MIN).clamp(T_MIN, 1.0)


def p2_weight(t: torch.Tensor, k: float = 1.0, gamma: float = 1.0) -> torch.Tensor:
    """P2 weight (Choi et al. 2022) (k + SNR)^−γ with SNR = ᾱ/(1−ᾱ). Released k = γ = 1, where it equals 1 − ᾱ."""
    a = alpha_bar(t)
    return (k + a / (1 - a)) ** -gamma


# ----------------------------------------------------------------------------------------------------------------
# Timestep embedding (both denoisers call it "r_embed"; c_r is its width)
# ----------------------------------------------------------------------------------------------------------------
MAX_POSITIONS = 10000  # t ∈ [0, 1] is scaled by this before the sinusoids, as in the released models


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of continuous t: [sin(t'·f_k), cos(t'·f_k)], t' = 10⁴·t. (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.arange(half, device=t.device).float().mul(-math.log(MAX_POSITIONS) / (half - 1)).exp()
    args = (t * MAX_POSITIONS)[:, None] * freqs[None, :]               # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=1)                   # (B, 2·half), sin first
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(t.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Timestep lists. A list of N+1 descending times means N model calls: at each t but the last.
# ----------------------------------------------------------------------------------------------------------------
def linear_timesteps(steps: int) -> torch.Tensor:
    """The default: linspace(1, 0, steps + 1). The released decoder uses 12 steps."""
    return torch.linspace(1.0, 0.0, steps + 1)


# Recommended prior list: 20 values from 1 to 2/3, then 10 more down to 0 (30 values, 29 model calls), dense at
# high noise where the layout of the 24×24 latent is decided. Built in float64 and then stored as float32, like the
# released constant (tests check that the two are identical).
STAGE_C_TIMESTEPS = torch.cat([torch.linspace(1.0, 2 / 3, 20, dtype=torch.float64),
                               torch.linspace(2 / 3, 0.0, 11, dtype=torch.float64)[1:]]).float()
STAGE_B_STEPS = 12


def check_timesteps(timesteps) -> torch.Tensor:
    """A user-given list as a float32 tensor; refuses anything that is not strictly descending within [0, 1]."""
    ts = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    if ts.numel() < 2 or not bool(torch.isfinite(ts).all()):
        raise ValueError(f"timesteps {timesteps!r}: expected at least 2 finite values, e.g. [1.0, 0.5, 0.0]")
    if ts.min() < 0 or ts.max() > 1 or not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps {ts.tolist()}: expected strictly descending values in [0, 1]")
    return ts


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
def ddpm_step(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t → x_{t_prev} (DDPM, Ho et al. 2020, Alg. 2, between arbitrary t > t_prev).

    With α = ᾱ(t)/ᾱ(t_prev): μ = (x − (1−α)·ε̂/√(1−ᾱ(t))) / √α and σ² = (1−α)(1−ᾱ(t_prev))/(1−ᾱ(t)).
    No noise is added on the step that lands on t_prev = 0, though the caller still draws it (see `sample`).
    t, t_prev: (B,).
    """
    a_t, a_prev = _per_sample(alpha_bar(t), x), _per_sample(alpha_bar(t_prev), x)
    alpha = a_t / a_prev
    # (1/α).sqrt()·(…) rather than (…)/√α: the released scheduler's order, which fixes the last bit.
    mean = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - a_t).sqrt())
    std = ((1 - alpha) * (1.0 - a_prev) / (1.0 - a_t)).sqrt()
    return (mean + std * noise * _per_sample((t_prev != 0).float(), x)).to(eps.dtype)


def sample(model, shape, cond: dict, uncond: dict | None = None, guidance: float = 0.0,
           timesteps=None, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
           x: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise from N(0, I) along `timesteps` with classifier-free guidance. Returns x at the last time (0).

    model(x, t, **cond) returns ε̂; a model with a `condition` method gets model.condition(**cond) instead, computed
    once for all steps (Stages B and C map their text there). Guidance w follows the released pipelines: it is on
    only for w > 1, and then ε̂ = ε̂_uncond + w·(ε̂_cond − ε̂_uncond), with cond and uncond run as one batch (cond
    first).
    Random numbers are drawn in the released pipelines' order, the initial noise, then one draw per step (the last
    included), so the same generator gives the same image as diffusers.
    """
    timesteps = check_timesteps(linear_timesteps(STAGE_B_STEPS) if timesteps is None else timesteps).to(device)
    noise_device = generator.device if generator is not None else device

    def randn():
        return torch.randn(shape, generator=generator, device=noise_device, dtype=dtype).to(device)

    use_cfg = uncond is not None and guidance > 1
    if use_cfg:
        cond = {k: torch.cat([cond[k], uncond[k]]) for k in cond}   # (2B, ...): cond first, then uncond
    if hasattr(model, "condition"):   # what depends on the conditioning alone is the same at every step: once here
        cond = model.condition(**cond)
    x = randn() if x is None else x.to(device, dtype)
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_b = t.expand(shape[0]).to(dtype)
        if use_cfg:
            eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t_b, t_b]), **cond).chunk(2)
            eps = torch.lerp(eps_uncond, eps_cond, guidance)
        else:
            eps = model(x, t_b, **cond)
        x = ddpm_step(x, eps, t_b, t_prev.expand(shape[0]), randn())
    return x
