"""Embeddings for the Total Coding Rate tests, one definition for every test file."""

import torch
import torch.nn.functional as F

KINDS = ("random", "near", "collapsed", "rank2")


def make_z(kind, n, b, d, dtype=torch.float64, seed=0, generator=None):
    """Unit-norm rows (n, b, d): random; nearly collapsed (one vector + 1e-3 noise); exactly
    collapsed (all rows equal); or rank-deficient (rank 2 < min(b, d)). Drawn in float64 on the
    generator's device (the CPU's seeded by ``seed`` when none is given): a CUDA generator draws
    there, with no host work that grows with the shape."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, device=g.device)

    if kind == "random":
        z = draw(n, b, d)
    elif kind == "near":
        z = draw(n, 1, d) + 1e-3 * draw(n, b, d)
    elif kind == "collapsed":
        z = draw(n, 1, d).expand(n, b, d)
    elif kind == "rank2":
        z = draw(n, b, 2) @ draw(n, 2, d)
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    return F.normalize(z, dim=-1).to(dtype).contiguous()
