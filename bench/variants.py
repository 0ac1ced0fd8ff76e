"""BatchNorm variants for bench/test_variants.py: the torch snippets users write today (the baselines) and, per
variant, how each provider is built, fed and stepped. The cases: bench/cases.py VARIANT_CASES.

- "masked" (issue 22): fwd+bwd of masked BN + ReLU on (N, C, L) with a (N, L) padding mask, padded outputs 0.
  "snippet": `MaskedBatchNorm1d` below (masked sums in Python: the mask multiply, the mean, the centred
  squares, the variance, the normalisation, the affine, each its own op and pass; then ReLU and `y * mask`), as
  copied from forum and GitHub snippets; "bnfast": FusedBatchNorm1d(C, activation="relu") called with `mask=`
  and `pad_value=0.0` (statistics over the valid positions, ReLU and the padding in one pass per stage).
- "ghost" (issue 22): fwd+bwd of ghost BN + ReLU (virtual batches of `case.chunk` samples). "snippet":
  `GhostBatchNorm` below (torch's BatchNorm called on each chunk in a Python loop, then `torch.cat`: TabNet's and
  most public implementations), then ReLU; "bnfast": FusedBatchNorm1d(C, activation="relu",
  virtual_batch_size=G) (the chunk is one more reduction axis: the same launches whatever the number of chunks).

Imports torch and bench (bnfast lazily, as bench/harness.py).
"""

from __future__ import annotations

import torch
from torch import nn

from bench import harness
from bench.cases import VariantCase


def _grad_step(module: nn.Module):
    """step(x, *other inputs, dy) -> (y, dx, dweight, dbias): one fwd+bwd of `module(x, *other inputs)`."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step(x, *rest):
        *inputs, dy = rest
        y = module(x, *inputs)
        return (y, *torch.autograd.grad(y, (x, *params), dy))

    return step


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """The Python masked BatchNorm users copy today (no library provides one): batch statistics over the valid
    positions by masked sums, running stats with the unbiased factor M/(M-1), every position normalised."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x (N, C, L), mask (N, L) bool
        m = mask.unsqueeze(1).to(x.dtype)
        if self.training:
            n = m.sum()
            mean = (x * m).sum((0, 2)) / n
            var = ((x - mean[None, :, None]) * m).pow(2).sum((0, 2)) / n
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / (n - 1))
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)
        return y * self.weight[None, :, None] + self.bias[None, :, None]


class MaskedSnippetReLU(nn.Module):
    """The snippet as users chain it: ReLU, then `y * mask` to zero the padding."""

    def __init__(self, bn: MaskedBatchNorm1d):
        super().__init__()
        self.bn = bn

    def forward(self, x, mask):
        return torch.relu(self.bn(x, mask)) * mask.unsqueeze(1).to(x.dtype)


class BnfastMasked(nn.Module):
    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x, mask):
        return self.bn(x, mask=mask, pad_value=0.0)


class _Masked:
    @staticmethod
    def build(provider: str, case: VariantCase, device) -> nn.Module:
        import bnfast

        seeded = harness.build_module("eager", case.base, device)[0]  # nn.BatchNorm1d with the seeded state
        C = case.shape[1]
        if provider == "bnfast":
            bn = bnfast.FusedBatchNorm1d(C, momentum=harness.MOMENTUM, eps=harness.EPS, activation="relu")
            module = BnfastMasked(bn)
        elif provider == "snippet":
            bn = MaskedBatchNorm1d(C, momentum=harness.MOMENTUM, eps=harness.EPS)
            module = MaskedSnippetReLU(bn)
        else:
            raise ValueError(f"unknown provider {provider!r}")
        bn.load_state_dict(seeded.state_dict())
        return module.to(device=device, dtype=case.base.torch_dtype).train()

    @staticmethod
    def inputs(case: VariantCase, device, copies: int):
        """[(x, mask, dy)] * copies; lengths uniform in [L/4, L] (one full-length sample), seeded."""
        N, _, L = case.shape
        gen = torch.Generator(device=device).manual_seed(1)
        out = []
        for _ in range(copies):
            x = (torch.randn(case.shape, generator=gen, device=device) * 2 + 0.5).to(case.base.torch_dtype)
            lengths = torch.randint(max(2, L // 4), L + 1, (N,), generator=gen, device=device)
            lengths[0] = L
            mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
            dy = torch.randn(case.shape, generator=gen, device=device).to(case.base.torch_dtype)
            out.append((x.requires_grad_(), mask, dy))
        return out

    step = staticmethod(_grad_step)  # step(x, mask, dy) -> (y, dx, dweight, dbias)


class GhostBatchNorm(nn.BatchNorm1d):
    """The ghost BatchNorm users write today: torch's BatchNorm on each chunk of `virtual_batch_size` samples in
    training (a Python loop, one BatchNorm call per chunk, then torch.cat); the running stats take each chunk's
    update in order. Eval: plain BatchNorm."""

    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm, self).forward(chunk) for chunk in x.split(self.virtual_batch_size)])


class GhostSnippetReLU(nn.Module):
    def __init__(self, bn: GhostBatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return torch.relu(self.bn(x))


class _Ghost:
    @staticmethod
    def build(provider: str, case: VariantCase, device) -> nn.Module:
        import bnfast

        seeded = harness.build_module("eager", case.base, device)[0]  # nn.BatchNorm1d with the seeded state
        C, G = case.shape[1], case.chunk
        if provider == "bnfast":
            module = bnfast.FusedBatchNorm1d(
                C, momentum=harness.MOMENTUM, eps=harness.EPS, activation="relu", virtual_batch_size=G
            )
            bn = module
        elif provider == "snippet":
            bn = GhostBatchNorm(C, G, momentum=harness.MOMENTUM, eps=harness.EPS)
            module = GhostSnippetReLU(bn)
        else:
            raise ValueError(f"unknown provider {provider!r}")
        bn.load_state_dict(seeded.state_dict())
        return module.to(device=device, dtype=case.base.torch_dtype).train()

    @staticmethod
    def inputs(case: VariantCase, device, copies: int):
        """[(x, dy)] * copies, seeded; each chunk with its own offset and scale (what makes ghost statistics differ
        from the batch's)."""
        gen = torch.Generator(device=device).manual_seed(1)
        chunks = -(-case.shape[0] // case.chunk)
        out = []
        for _ in range(copies):
            scale = torch.rand(chunks, generator=gen, device=device).add(0.5).repeat_interleave(case.chunk)
            scale = scale[: case.shape[0]].view(-1, *(1,) * (len(case.shape) - 1))
            x = torch.randn(case.shape, generator=gen, device=device) * scale + scale
            dy = torch.randn(case.shape, generator=gen, device=device).to(case.base.torch_dtype)
            out.append((x.to(case.base.torch_dtype).requires_grad_(), dy))
        return out

    step = staticmethod(_grad_step)  # step(x, dy) -> (y, dx, dweight, dbias)


VARIANTS = {"masked": _Masked, "ghost": _Ghost}


def build(provider: str, case: VariantCase, device) -> nn.Module:
    return VARIANTS[case.variant].build(provider, case, device)


def make_inputs(case: VariantCase, device, copies: int):
    return VARIANTS[case.variant].inputs(case, device, copies)


def make_step(module: nn.Module, case: VariantCase):
    return VARIANTS[case.variant].step(module)


def reference(case: VariantCase, device, inputs) -> tuple:
    """The snippet in float64 from the same seeded state, on the same inputs: the outputs every provider is checked
    against (the snippet is the definition users have today; tests/test_bench_smoke.py holds bnfast to it)."""
    module = build("snippet", case, device).double()
    x, *rest = inputs
    x64 = x.detach().double().requires_grad_()
    rest = [r.double() if r.is_floating_point() else r for r in rest]
    return tuple(t.detach() for t in make_step(module, case)(x64, *rest))
