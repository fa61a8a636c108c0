"""Rejection sampling of proposed tokens (Leviathan et al., 2023; Chen et al., 2023).

A draft token x proposed with probability q(x) is accepted with probability min(1, p(x) / q(x)), p being the
target's distribution after every sampling setting (temperature, top-k, top-p, min-p); when rejected, the
token is drawn from the residual max(0, p - q), renormalized. Whatever q is, the emitted token is then
distributed exactly as p. An n-gram proposal is a certain guess (q is one-hot at x): accepted with
probability p(x), and on rejection drawn from p with x removed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def rejection_sample(probs: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                     generators: list[tuple[int, torch.Generator]],
                     race: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One token per row of probs [rows, vocab] (the target's processed distribution).

    draft_ids [rows]: the draft token this row verifies, -1 where there is none (a bonus row, or a row of
    a sequence without proposals: plainly sampled from p). draft_probs [rows, vocab]: the distributions the
    draft tokens were drawn from; None for certain guesses (n-gram). generators: (row, generator) of seeded
    rows. race: draws one token per row from unnormalized weights. A row's token equals its draft token
    exactly when the draft is accepted (the residual never holds x)."""
    has_draft = draft_ids >= 0
    x = draft_ids.clamp_min(0)[:, None]
    p_x = probs.gather(1, x).squeeze(1)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
        residual = probs.scatter(1, x, 0.0)
    else:
        q_x = draft_probs.gather(1, x).squeeze(1)
        residual = (probs - draft_probs).clamp_min_(0.0)
    u = torch.rand(p_x.shape, device=probs.device)
    for row, generator in generators:
        u[row] = torch.rand((), generator=generator, device=probs.device)
    accepted = has_draft & (u * q_x < p_x)  # u < p/q without dividing by a zero q
    # An empty residual (p == q) only comes with certain acceptance; and rows without a draft sample p.
    plain = ~has_draft | (residual.sum(dim=-1) <= 0)
    residual = torch.where(plain[:, None], probs, residual)
    return torch.where(accepted, x.squeeze(1), race(residual))
