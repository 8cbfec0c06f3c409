"""Helpers that the Mamba and Mamba2 layer tests share."""

import torch


def perturbed(layer):
    """``layer`` with every parameter perturbed, so no layout mistake hides behind a constant init."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def prefill_then_steps(layer, h, n_prefill, mask=None):
    """Outputs of a prefill of n_prefill tokens (full path, or none) then one decode step per token."""
    cache = layer.allocate_cache(h.shape[0], h.shape[1])
    outs = []
    if n_prefill:
        outs.append(layer(h[:, :n_prefill], cache, mask=None if mask is None else mask[:, :n_prefill]))
    for t in range(n_prefill, h.shape[1]):
        outs.append(layer(h[:, t : t + 1], cache, mask=None if mask is None else mask[:, : t + 1]))
    return torch.cat(outs, dim=1), cache
