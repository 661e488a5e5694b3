"""``init="weights"``: Lego filters, selection and coefficients that reconstruct a trained conv.

Cut every filter of the conv into its ``o`` fragments: ``N = n*o`` vectors ``v`` of length
``d = c/o*kh*kw``. Find ``m`` unit vectors ``B_k`` (the Lego filters), an assignment ``k(v)``
and scales ``a(v)`` minimising ``sum ||v - a(v) B_k(v)||^2``. For a fixed assignment the best
scale is ``a = <v, B_k>`` (any sign) and the error is ``sum ||v||^2 - sum <v, B_k>^2``, so:

1. start from ``m`` fragments picked by k-means++ on the directions (sign-blind distance
   ``1 - |cos|``), weighted by fragment energy, among ``4*m`` energy-weighted candidates;
2. alternate: assign each fragment to the Lego filter with the largest ``|<v, B_k>|``; move
   each ``B_k`` to the normalised ``sum a(v) v`` of its fragments (one power-iteration step
   towards the top eigenvector of their scatter matrix, which is the optimum); refill an
   empty Lego filter with the worst-reconstructed fragment;
3. stop when the error no longer falls (or after ``iterations``).

With ``m >= N`` every fragment gets its own Lego filter and the reconstruction is exact
(``o=1, m=1.0`` reproduces the conv). The result is returned with its relative error
``||W - W_rec|| / ||W||``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _seed_atoms(unit: Tensor, energy: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """k-means++ on a sample: ``m`` directions, far apart (``1 - |cos|``), energy-weighted.
    Candidates are drawn from at most ``4*m`` fragments so that seeding stays cheap."""
    pool = torch.multinomial(energy, min(len(energy), 4 * m), generator=generator)
    unit, energy = unit[pool], energy[pool]
    similarity = (unit @ unit.T).abs()
    chosen = [int(torch.multinomial(energy, 1, generator=generator))]
    distance = 1 - similarity[chosen[0]]
    for _ in range(1, m):
        weights = distance.clamp_min(0) * energy
        weights[chosen] = 0
        if weights.sum() <= 0:  # every fragment is (anti)parallel to a chosen one
            weights = torch.ones_like(energy)
            weights[chosen] = 0
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        distance = torch.minimum(distance, 1 - similarity[pick])
    return unit[chosen].clone()


def fit_lego(weight: Tensor, o: int, m: int, iterations: int = 50, seed: int = 0,
             tolerance: float = 1e-4) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(lego (m, c/o, kh, kw), selection (n, o), coef (n, o), relative error)`` for a
    ``(n, c, kh, kw)`` conv weight, in the weight's dtype (float64 stays float64, the rest is
    fitted in float32). Refinement stops when the error falls by less than ``tolerance``
    (relative) in an iteration."""
    n, c, kh, kw = weight.shape
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    vectors = weight.detach().to(dtype).reshape(n * o, c // o * kh * kw)
    energy = vectors.square().sum(1)
    total = energy.sum().item()
    if total == 0:
        lego = torch.zeros(m, c // o, kh, kw, dtype=weight.dtype, device=weight.device)
        zeros = torch.zeros(n, o, dtype=torch.int64, device=weight.device)
        return lego, zeros, zeros.to(weight.dtype), 0.0
    unit = vectors / energy.sqrt().clamp_min(1e-30).unsqueeze(1)
    if m >= n * o:  # one Lego filter per fragment: exact
        atoms = torch.cat([unit, unit[:1].expand(m - n * o, -1)])
    else:
        generator = torch.Generator().manual_seed(seed)
        atoms = _seed_atoms(unit.cpu(), energy.cpu(), m, generator).to(unit.device)
    best = (None, None, None, float("inf"))
    for _ in range(iterations):
        similarity = vectors @ atoms.T
        choice = similarity.abs().argmax(1)
        scale = similarity.gather(1, choice.unsqueeze(1)).squeeze(1)
        error = max(total - scale.double().square().sum().item(), 0.0)
        improved = best[3] - error
        if improved > 0:
            best = (atoms, choice, scale, error)
        if improved <= tolerance * best[3]:
            break
        members = torch.zeros(m, n * o, dtype=dtype, device=vectors.device)
        members[choice, torch.arange(n * o, device=vectors.device)] = scale
        moved = members @ vectors  # sum of a(v) v over each Lego filter's fragments
        norms = moved.norm(dim=1)
        residual = energy - scale.square()
        for k in torch.nonzero(norms == 0).flatten().tolist():  # refill empty Lego filters
            worst = int(residual.argmax())
            moved[k], norms[k] = unit[worst], 1.0
            residual[worst] = -1
        atoms = moved / norms.unsqueeze(1)
    atoms, choice, scale, error = best
    lego = atoms.reshape(m, c // o, kh, kw).to(weight.dtype)
    return lego, choice.reshape(n, o), scale.reshape(n, o).to(weight.dtype), (error / total) ** 0.5
