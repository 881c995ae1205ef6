"""SLAB's norms: RepBN, the progressive LayerNorm -> RepBN blend, and the folded leftover affine.

* :class:`RepBN` — ``RepBN(x) = BN(x) + eta * x`` with a learnable scalar ``eta``; the batch
  statistics are taken per channel over batch x tokens, padding tokens excluded (the mask comes
  from :func:`install_token_mask_hook`).
* :class:`ProgressiveNorm` — ``gamma * Norm(x) + (1 - gamma) * RepBN(x)`` in training, gamma = 1
  during warm-up then linearly 1 -> 0 over ``decay`` steps; always ``RepBN(x)`` in eval. The
  counters are buffers (a resumed run keeps its place), and they advance once per *optimizer
  step* through :meth:`ProgressiveNorm.advance` (SLAB's ``LinearNorm`` counts forwards, so
  gradient accumulation would run its schedule faster).
* :class:`ChannelAffine` — ``x * scale + shift``: what is left of a norm whose affine could not be
  folded into a neighbour (the model output itself, or a head tied to the embeddings).
"""

from __future__ import annotations

import torch
from torch import nn

#: BatchNorm's running-statistics momentum and epsilon (torch's BatchNorm1d defaults)
MOMENTUM = 0.1
BN_EPS = 1e-5


class RepBN(nn.Module):
    """``BN(x) + eta * x`` over the last dimension of ``x`` (B, N, C) or (B, C).

    Args:
        dim: channels.
        eta: initial value of the scalar ``eta`` (SLAB's vision code: 1; its LLaMA code: 0).
    """

    running_mean: torch.Tensor  # buffers (register_buffer)
    running_var: torch.Tensor

    def __init__(self, dim: int, eta: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eta = nn.Parameter(torch.full((1,), float(eta)))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        #: (B, N) bool, True for real tokens; set by the token-mask hook for one forward
        self.token_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            a, b = self.affine()
            return x * a.to(x.dtype) + b.to(x.dtype)
        flat = x.reshape(-1, x.shape[-1])  # (B*N, C)
        mask = self.token_mask
        if mask is not None and x.ndim == 3 and mask.shape == x.shape[:2]:
            flat = flat[mask.reshape(-1).bool()]  # statistics over real tokens only
        mean = flat.mean(0)
        var = flat.var(0, unbiased=False)
        with torch.no_grad():
            n = flat.shape[0]
            self.running_mean.mul_(1 - MOMENTUM).add_(mean.detach(), alpha=MOMENTUM)
            self.running_var.mul_(1 - MOMENTUM).add_(var.detach() * n / max(n - 1, 1), alpha=MOMENTUM)
        bn = (x - mean) * torch.rsqrt(var + BN_EPS) * self.weight + self.bias
        return bn + self.eta * x

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode map as ``y = a * x + b`` (per channel), computed in float64.

        a = weight / sqrt(running_var + eps) + eta;  b = bias - weight * running_mean / sqrt(running_var + eps)
        """
        inv = torch.rsqrt(self.running_var.double() + BN_EPS)
        w = self.weight.double()
        a = w * inv + self.eta.double()
        b = self.bias.double() - w * self.running_mean.double() * inv
        return a, b

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class ProgressiveNorm(nn.Module):
    """SLAB's progressive replacement of ``norm`` by ``repbn`` (its ``LinearNorm``).

    Args:
        norm: the original norm (LayerNorm or RMSNorm); kept only for training.
        repbn: the replacement.
        decay: T, optimizer steps over which gamma goes 1 -> 0 (0: RepBN from the first step).
        warmup: optimizer steps with gamma = 1 (output = norm only) before the decay starts.
    """

    step: torch.Tensor  # buffers (register_buffer)
    warmup: torch.Tensor
    decay: torch.Tensor

    def __init__(self, norm: nn.Module, repbn: RepBN, decay: int, warmup: int = 0):
        super().__init__()
        self.norm = norm
        self.repbn = repbn
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("warmup", torch.tensor(int(warmup), dtype=torch.long))
        self.register_buffer("decay", torch.tensor(int(decay), dtype=torch.long))

    def gamma(self) -> float:
        """1 during warm-up and at its end, 1 - t / T after it, 0 at and after T."""
        t = int(self.step) - int(self.warmup)
        if t < 0:
            return 1.0
        T = int(self.decay)
        return 0.0 if T <= 0 or t >= T else 1.0 - t / T

    def advance(self, n: int = 1) -> None:
        """Move the schedule on by ``n`` optimizer steps."""
        self.step += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.repbn(x)
        if int(self.step) < int(self.warmup):
            return self.norm(x)
        g = self.gamma()
        if g == 0.0:
            return self.repbn(x)
        return g * self.norm(x) + (1.0 - g) * self.repbn(x)


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: a folded norm's affine where no neighbour can absorb it."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def progressive_norms(model: nn.Module) -> list[ProgressiveNorm]:
    return [m for m in model.modules() if isinstance(m, ProgressiveNorm)]


def advance_schedule(model: nn.Module, n: int = 1) -> None:
    """The per-optimizer-step hook: advance every ProgressiveNorm of ``model`` once."""
    for m in progressive_norms(model):
        m.advance(n)


def _set_token_mask(module: nn.Module, args: tuple, kwargs: dict):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
    for m in module.modules():
        if isinstance(m, RepBN):
            m.token_mask = mask
    return None


def _clear_token_mask(module: nn.Module, args: tuple, kwargs: dict, output):
    for m in module.modules():
        if isinstance(m, RepBN):
            m.token_mask = None
    return None


def install_token_mask_hook(base: nn.Module) -> None:
    """Let every RepBN under ``base`` see the forward's ``attention_mask`` (padding excluded from
    the batch statistics). Installed once; the hooks are module-level functions, so they survive
    ``copy.deepcopy``."""
    if any(h is _set_token_mask for h in base._forward_pre_hooks.values()):
        return
    base.register_forward_pre_hook(_set_token_mask, with_kwargs=True)
    base.register_forward_hook(_clear_token_mask, with_kwargs=True)
