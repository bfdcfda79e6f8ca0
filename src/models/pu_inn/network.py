"""The PU-INN upsampler: local features from the k nearest neighbours (EdgeConv), a conditional residual flow
from xyz to a latent space, learnt convex interpolation of latent codes to r times as many points, and the
inverse flow back to xyz.

Where the flow earns its place is the inverse: each new point is decoded with the context of the point that made
it (its parent; PU-Flow, Mao et al., TVCG 2022, repeats each point's context to its r children). Decoded with the
same convex mix of the neighbours' contexts as its latent code, a flow that is close to affine across a patch
returns the convex mix of the neighbours' xyz, whatever its parameters (``F^-1(sum w F(x_k; c_k); sum w c_k) =
sum w x_k`` for an affine block), so the reconstruction loss never reached them; decoded with the parent's own
context, a context-dependent shift of the flow becomes a first-order offset of the new point off the chord
between its neighbours (``decode_context``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from src.geometry.knn import knn_points
from src.geometry.sampling import farthest_point_sample
from src.models.pu_inn.flow import ResidualBlock, SpectralNormLinear
from src.phases import phase

FEATURES = ("dense", "edge2")
INTERPS = ("pair", "point")
DECODE_CONTEXTS = ("parent", "mixed")


def knn(points: torch.Tensor, k: int, queries: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, M, k) of the k nearest ``points`` (B, N, 3) of each query (default: the points themselves,
    which then come first)."""
    return knn_points(points if queries is None else queries, points, k)[1]


def gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values (B, N, C), idx (B, M, k) -> (B, M, k, C)."""
    b, m, k = idx.shape
    return values.gather(1, idx.reshape(b, m * k, 1).expand(-1, -1, values.shape[-1])).reshape(b, m, k, -1)


class EdgeConv(nn.Module):
    """``f_i = max_j MLP([h_i, h_j - h_i])`` over the k nearest neighbours j of point i (DGCNN)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * in_dim, out_dim), nn.LeakyReLU(0.2), nn.Linear(out_dim, out_dim))

    def forward(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nb = gather(h, idx)  # (B, N, k, C)
        centre = h[:, :, None].expand_as(nb)
        return self.mlp(torch.cat([centre, nb - centre], -1)).amax(2)


class DenseEdgeFeatures(nn.Module):
    """Per-point features with patch-wide context: ``n_layers`` EdgeConv layers on the kNN graph of the input, each
    seeing the input and every earlier layer's output (dense connections, as PU-Flow's and PU-GAN's feature units),
    then each point's stack beside the patch's max-pooled stack (DGCNN's global feature), merged by an MLP."""

    def __init__(self, feat_dim: int, n_layers: int = 3, growth: int = 24) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        width = 3
        for _ in range(n_layers):
            self.convs.append(EdgeConv(width, growth))
            width += growth
        self.merge = nn.Sequential(nn.Linear(2 * width, feat_dim), nn.LeakyReLU(0.2), nn.Linear(feat_dim, feat_dim))

    def forward(self, pts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = pts
        for conv in self.convs:
            h = torch.cat([h, conv(h, idx)], -1)
        return self.merge(torch.cat([h, h.amax(1, keepdim=True).expand_as(h)], -1))


class TwoEdgeFeatures(nn.Module):
    """Two EdgeConv layers, concatenated (no wider context): the features' ablation."""

    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        self.edge1 = EdgeConv(3, feat_dim // 2)
        self.edge2 = EdgeConv(feat_dim // 2, feat_dim - feat_dim // 2)

    def forward(self, pts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        f1 = self.edge1(pts, idx)
        return torch.cat([f1, self.edge2(f1, idx)], -1)


class LocalRefine(nn.Module):
    """A learnt step in xyz for each new point from its own neighbourhood (as Grad-PU refines points by the inputs
    around them): the offsets of its ``k`` nearest input points in units of its parent's spacing, with their
    features, max-pooled by a shared MLP (PointNet), then an MLP to a step of at most one spacing in each
    coordinate. The last map starts at zero: at initialisation the points are the decoded ones."""

    def __init__(self, feat_dim: int, k: int = 8) -> None:
        super().__init__()
        self.k = k
        self.local = nn.Sequential(nn.Linear(feat_dim + 4, feat_dim), nn.ReLU(), nn.Linear(feat_dim, feat_dim))
        self.step = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, 3))
        nn.init.zeros_(self.step[-1].weight)
        nn.init.zeros_(self.step[-1].bias)

    def forward(self, points: torch.Tensor, sparse: torch.Tensor, feat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """points (B, M, 3) near the inputs sparse (B, N, 3) with features (B, N, C); scale (B, M, 1): each point's
        length unit. -> steps (B, M, 3), each coordinate within (-scale, scale)."""
        idx = knn(sparse, min(self.k, sparse.shape[1]), queries=points)  # (B, M, k)
        rel = (gather(sparse, idx) - points[:, :, None]) / scale[..., None]  # (B, M, k, 3)
        h = self.local(torch.cat([rel, rel.norm(dim=-1, keepdim=True), gather(feat, idx)], -1)).amax(2)
        return torch.tanh(self.step(h)) * scale


class PUINN(nn.Module):
    """Args: k: neighbours for features and interpolation. feat_dim: per-point feature (the flow's context) size.
    features: ``dense`` (``DenseEdgeFeatures`` with ``feat_layers`` layers) or ``edge2`` (two EdgeConvs, an
    ablation). n_blocks, hidden, n_layers, coeff: the flow (``ResidualBlock``); flow_init_gain: scale of the last map
    of each block's g at initialisation (small: the flow starts near the identity, so the first new points are
    the convex mixes of the interpolation and not random offsets). estimator / eval_estimator and the series
    options: the log-det estimators (roulette: a series length per point or per batch). up_ratio: r.
    inverse_grad: the inverse flow's gradient, ``implicit`` (exact, the default) or ``unrolled``
    (``inverse_grad_steps`` iterations with a graph: the older truncated gradient).

    interp: how the convex weights over the k neighbours are made, ``pair`` (each (point, neighbour) pair's
    features and offset, as PU-Flow's weight unit: every neighbour gets its own logit) or ``point`` (from each
    point's feature alone, by neighbour rank: an ablation); interp_prior: the starting logit of the
    neighbours other than the point itself and the r + more_up - 1 spread evenly over the k ranks (0 for those; the
    nearest ones when k = r + more_up), a learnt parameter.
    more_up: extra candidates a point (PU-GAN's ``more_up``, 2 in its release): (r + more_up) N points are made and
    farthest-point sampled to r N. decode_context: the context each new point is decoded with, ``parent`` (its
    point's own, as PU-Flow) or ``mixed`` (the weights' mix of the neighbours' contexts: an ablation, where
    the flow cancels; module docstring). refine: a learnt step in xyz after decoding, zero at the start and bounded
    by the parent's spacing to its nearest input in each coordinate, from the point's ``refine_k`` nearest inputs
    (``LocalRefine``; PU-GAN and Grad-PU regress coordinates)."""

    def __init__(self, k: int = 16, feat_dim: int = 64, n_blocks: int = 4, hidden: int = 64, n_layers: int = 3,
                 coeff: float = 0.97, up_ratio: int = 4, estimator: str = "poisson", eval_estimator: str = "exact",
                 n_exact_terms: int = 2, lam: float = 2.0, n_terms: int = 10, neumann_grad: bool = True,
                 inverse_grad: str = "implicit", inverse_grad_steps: int = 5, roulette: str = "point",
                 features: str = "dense", feat_layers: int = 3, flow_init_gain: float = 0.1, interp: str = "pair",
                 interp_prior: float = -4.0, more_up: int = 0, decode_context: str = "parent",
                 refine: bool = False, refine_k: int = 8) -> None:
        super().__init__()
        for key, value, allowed in (("features", features, FEATURES), ("interp", interp, INTERPS),
                                    ("decode_context", decode_context, DECODE_CONTEXTS)):
            if value not in allowed:
                raise ValueError(f"model.net.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if more_up < 0 or up_ratio + more_up > k:
            raise ValueError(f"model.net.more_up must be in [0, k - up_ratio] = [0, {k - up_ratio}], got {more_up!r}")
        self.k, self.up_ratio, self.more_up = k, up_ratio, more_up
        self.n_sets = n_sets = up_ratio + more_up  # candidates a point; farthest-point sampling keeps r N of all
        self.interp_mode, self.decode_context = interp, decode_context
        self.feature_net = DenseEdgeFeatures(feat_dim, feat_layers) if features == "dense" else TwoEdgeFeatures(feat_dim)
        self.blocks = nn.ModuleList([
            ResidualBlock(3, hidden, n_layers, coeff, estimator, eval_estimator, n_terms, n_exact_terms, lam,
                          neumann_grad=neumann_grad, context_dim=feat_dim, inverse_grad=inverse_grad,
                          inverse_grad_steps=inverse_grad_steps, roulette=roulette) for _ in range(n_blocks)])
        with torch.no_grad():
            for block in self.blocks:
                last = [m for m in block.g if isinstance(m, SpectralNormLinear)][-1]
                last.weight.mul_(flow_init_gain)
                last.bias.mul_(flow_init_gain)
        # n_sets convex weight sets over the k neighbours, started at "the point itself and the midpoints towards
        # neighbours spread over the k ranks" (ranks 1, 2, ..., n_sets - 1 when n_sets = k; every other rank when
        # k = 2 n_sets): a prior on the logits by neighbour rank (0 for the chosen ones, interp_prior else)
        prior = torch.full((n_sets, k), float(interp_prior))
        prior[:, 0] = 0.0
        for m in range(1, n_sets):
            prior[m, round(m * (k - 1) / max(1, n_sets - 1))] = 0.0
        if interp == "point":
            self.interp = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, n_sets * k))
            nn.init.zeros_(self.interp[-1].weight)
            with torch.no_grad():
                self.interp[-1].bias.copy_(prior.flatten())
        else:  # [f_i, f_j - f_i, offset, distance] of each pair; the MLP's small random init breaks the symmetry
            self.interp = nn.Sequential(nn.Linear(2 * feat_dim + 4, feat_dim), nn.ReLU(), nn.Linear(feat_dim, n_sets))
            with torch.no_grad():
                self.interp[-1].weight.mul_(0.1)
                self.interp[-1].bias.zero_()
            self.interp_prior = nn.Parameter(prior.t().contiguous())  # (k, n_sets)
        self.refine = LocalRefine(feat_dim, refine_k) if refine else None

    def features(self, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-point features (B, N, feat_dim) and the kNN indices (B, N, k) (each point first)."""
        idx = knn(pts, self.k)
        return self.feature_net(pts, idx), idx

    def flow(self, x: torch.Tensor, context: torch.Tensor, with_logdet: bool = True, estimator: str | None = None):
        """xyz (M, 3) -> latent (M, 3) and the summed log-det (M,) (or None), by ``estimator`` (default each
        block's training / evaluation one)."""
        total = None
        for block in self.blocks:
            x, ld = block(x, context, with_logdet=with_logdet, estimator=estimator)
            if ld is not None:
                total = ld if total is None else total + ld
        return x, total

    def flow_inverse(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, context)
        return z

    def forward(self, sparse: torch.Tensor, up_ratio: int | None = None, with_logdet: bool = False) -> dict[str, torch.Tensor]:
        """sparse (B, N, 3) -> dense (B, r N, 3); also the latent codes, the features, (``with_logdet``) the
        log-det of the flow at the sparse points (off by default: upsampling never needs it), ``flow_offset``
        (B, N, r + more_up): how far the flow moved each new point from the convex mix of its neighbours' xyz, in
        units of its parent's spacing to its nearest input (0 for a flow that cancels), and with ``more_up`` the
        (r + more_up) N ``candidates`` the dense points were farthest-point sampled from."""
        r = up_ratio or self.up_ratio
        if r != self.up_ratio:
            raise ValueError(f"this model interpolates {self.up_ratio} points per input point, not {r}")
        s = self.n_sets
        b, n, _ = sparse.shape
        with phase("features"):
            feat, idx = self.features(sparse)
        ctx = feat.reshape(b * n, -1)
        with phase("flow.forward"):
            z, logdet = self.flow(sparse.reshape(b * n, 3), ctx, with_logdet=with_logdet)
        with phase("interpolate"):
            x_nb = gather(sparse, idx)  # (B, N, k, 3)
            spacing = (x_nb[:, :, 1] - sparse).norm(dim=-1).clamp(min=1e-8)  # (B, N): to the nearest other input
            w = torch.softmax(self.interp_logits(sparse, feat, idx, x_nb), -1)  # (B, N, s, k)
            z_new = torch.einsum("bnsk,bnkc->bnsc", w, gather(z.reshape(b, n, 3), idx)).reshape(b * n * s, 3)
            if self.decode_context == "parent":
                c_new = feat[:, :, None].expand(-1, -1, s, -1).reshape(b * n * s, -1)
            else:
                c_new = torch.einsum("bnsk,bnkc->bnsc", w, gather(feat, idx)).reshape(b * n * s, -1)
        with phase("flow.inverse"):
            cand = self.flow_inverse(z_new, c_new).reshape(b, n, s, 3)
        with torch.no_grad():  # a diagnostic (val/flow_offset): no graph on the training path
            mix = torch.einsum("bnsk,bnkc->bnsc", w, x_nb)
            flow_offset = (cand - mix).norm(dim=-1) / spacing[..., None]
        out = {"latent": z.reshape(b, n, 3), "features": feat, "logdet": None if logdet is None else logdet.reshape(b, n),
               "flow_offset": flow_offset}
        dense = cand.reshape(b, n * s, 3)
        if self.refine is not None:
            with phase("refine"):
                scale = spacing[:, :, None].expand(-1, -1, s).reshape(b, n * s, 1)
                dense = dense + self.refine(dense, sparse, feat, scale)
        if self.more_up:
            with phase("select"):  # PU-GAN's more_up: (r + more_up) N candidates, farthest-point sampled to r N
                out["candidates"] = dense
                keep = farthest_point_sample(dense, n * r)
                dense = dense.gather(1, keep[..., None].expand(-1, -1, 3))
        return {"dense": dense, **out}

    def interp_logits(self, sparse: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor, x_nb: torch.Tensor) -> torch.Tensor:
        """(B, N, n_sets, k) logits of the convex weights."""
        b, n, k = idx.shape
        if self.interp_mode == "point":
            return self.interp(feat).reshape(b, n, self.n_sets, k)
        centre = feat[:, :, None].expand(-1, -1, k, -1)
        offset = x_nb - sparse[:, :, None]
        offset = offset / offset.norm(dim=-1, keepdim=True).amax(2, keepdim=True).clamp(min=1e-8)  # k-th-neighbour units
        pair = torch.cat([centre, gather(feat, idx) - centre, offset, offset.norm(dim=-1, keepdim=True)], -1)
        return (self.interp(pair) + self.interp_prior).transpose(2, 3)

    def refresh(self, n: int = 50) -> None:
        for block in self.blocks:
            block.refresh(n)
