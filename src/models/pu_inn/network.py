"""The PU-INN upsampler: local features from k nearest neighbours (EdgeConv), a conditional residual flow
from xyz to a latent space, learnt convex interpolation of latent codes to r times as many points, and the
inverse flow back to xyz."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from src.geometry.knn import knn_points
from src.geometry.pu_metrics import farthest_point_sample
from src.models.pu_inn.flow import ResidualBlock
from src.phases import phase


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


class PUINN(nn.Module):
    """Args: k: neighbours for features and interpolation. feat_dim: per-point feature size. n_blocks, hidden,
    n_layers, coeff: the flow (``ResidualBlock``). estimator / eval_estimator and the series options: the
    log-det estimators (roulette: a series length per point or per batch). up_ratio: r. inverse_grad: the
    inverse flow's gradient, ``implicit`` (exact, the default) or ``unrolled`` (``inverse_grad_steps``
    iterations with a graph: the older truncated gradient). interp: how the r convex weight sets over the k
    neighbours are made, ``point`` (from each point's feature, by neighbour rank) or ``pair`` (from each
    point-neighbour pair's features and offset); interp_prior: the starting logit of the neighbours other than
    the point itself and its r + more_up - 1 nearest (0 for those). more_up: extra candidates a point (PU-GAN's
    ``more_up``, 2 in its release): (r + more_up) N points are made and farthest-point sampled to r N, so the
    kept ones spread into the gaps. latent_offset: add to each interpolated code a learnt step from the point's
    feature, each coordinate bounded by the latent distance to its k-th neighbour, so new points can leave
    the neighbours' convex hull into the gaps (off: purely convex)."""

    def __init__(self, k: int = 16, feat_dim: int = 64, n_blocks: int = 4, hidden: int = 64, n_layers: int = 3,
                 coeff: float = 0.97, up_ratio: int = 4, estimator: str = "poisson", eval_estimator: str = "exact",
                 n_exact_terms: int = 2, lam: float = 2.0, n_terms: int = 10, neumann_grad: bool = True,
                 inverse_grad: str = "implicit", inverse_grad_steps: int = 5, roulette: str = "point", interp: str = "point",
                 interp_prior: float = -4.0, more_up: int = 0, latent_offset: bool = False) -> None:
        super().__init__()
        if more_up < 0 or up_ratio + more_up > k:
            raise ValueError(f"model.net.more_up must be in [0, k - up_ratio] = [0, {k - up_ratio}], got {more_up!r}")
        self.k, self.up_ratio, self.more_up = k, up_ratio, more_up
        self.n_sets = n_sets = up_ratio + more_up  # candidates a point; farthest-point sampling keeps r N of all
        self.edge1 = EdgeConv(3, feat_dim // 2)
        self.edge2 = EdgeConv(feat_dim // 2, feat_dim - feat_dim // 2)
        self.blocks = nn.ModuleList([
            ResidualBlock(3, hidden, n_layers, coeff, estimator, eval_estimator, n_terms, n_exact_terms, lam,
                          neumann_grad=neumann_grad, context_dim=feat_dim, inverse_grad=inverse_grad,
                          inverse_grad_steps=inverse_grad_steps, roulette=roulette) for _ in range(n_blocks)])
        if interp not in ("point", "pair"):
            raise ValueError(f"model.net.interp must be 'point' or 'pair', got {interp!r}")
        self.interp_mode = interp
        # r sets of convex weights over the k neighbours. point: from each point's feature alone (weights by
        # neighbour rank); pair: from each (point, neighbour) pair, [f_i, f_j - f_i, p_j - p_i], so a weight can
        # depend on where that neighbour lies (attention-style)
        in_dim = feat_dim if interp == "point" else 2 * feat_dim + 3
        out_dim = n_sets * k if interp == "point" else n_sets
        self.interp = nn.Sequential(nn.Linear(in_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, out_dim))
        # start near "the point itself and midpoints towards its nearest neighbours": a prior on the logits by
        # neighbour rank (0 for the chosen ones, ``interp_prior`` for the rest)
        prior = torch.full((n_sets, k), float(interp_prior))
        prior[:, 0] = 0.0
        for m in range(1, n_sets):
            prior[m, m] = 0.0
        if interp == "point":
            nn.init.zeros_(self.interp[-1].weight)
            with torch.no_grad():
                self.interp[-1].bias.copy_(prior.flatten())
        else:  # the MLP's own (small, random) init breaks the symmetry between the r weight sets
            with torch.no_grad():
                self.interp[-1].weight.mul_(0.1)
                self.interp[-1].bias.zero_()
            self.interp_prior = nn.Parameter(prior.t().contiguous())  # (k, r)
        # latent_offset: a bounded step from each interpolated code, |each coordinate| < the distance to the
        # point's k-th neighbour in the latent; zero at the start (so the model starts as the convex one)
        self.offset = None
        if latent_offset:
            self.offset = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(), nn.Linear(feat_dim, n_sets * 3))
            nn.init.zeros_(self.offset[-1].weight)
            nn.init.zeros_(self.offset[-1].bias)

    def features(self, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = knn(pts, self.k)
        f1 = self.edge1(pts, idx)
        return torch.cat([f1, self.edge2(f1, idx)], -1), idx

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
        """sparse (B, N, 3) -> dense (B, r N, 3); also the latent codes and (``with_logdet``) the log-det of
        the flow at the sparse points (off by default: upsampling never needs it); with ``more_up`` also the
        (r + more_up) N ``candidates`` the dense points were farthest-point sampled from."""
        r = up_ratio or self.up_ratio
        if r != self.up_ratio:
            raise ValueError(f"this model interpolates {self.up_ratio} points per input point, not {r}")
        r_all = self.n_sets
        b, n, _ = sparse.shape
        with phase("features"):
            feat, idx = self.features(sparse)
        ctx = feat.reshape(b * n, -1)
        with phase("flow.forward"):
            z, logdet = self.flow(sparse.reshape(b * n, 3), ctx, with_logdet=with_logdet)
        with phase("interpolate"):
            z_nb = gather(z.reshape(b, n, 3), idx)  # (B, N, k, 3)
            c_nb = gather(feat, idx)
            w = torch.softmax(self.interp_logits(sparse, feat, idx, c_nb), -1)  # (B, N, r, k)
            z_new = torch.einsum("bnrk,bnkc->bnrc", w, z_nb)  # (B, N, r, 3)
            if self.offset is not None:
                reach = (z_nb - z.reshape(b, n, 1, 3)).norm(dim=-1).amax(-1)  # (B, N): to the k-th neighbour
                z_new = z_new + torch.tanh(self.offset(feat)).reshape(b, n, r_all, 3) * reach[..., None, None]
            z_new = z_new.reshape(b * n * r_all, 3)
            c_new = torch.einsum("bnrk,bnkc->bnrc", w, c_nb).reshape(b * n * r_all, -1)
        with phase("flow.inverse"):
            dense = self.flow_inverse(z_new, c_new).reshape(b, n * r_all, 3)
        out = {"latent": z.reshape(b, n, 3), "features": feat, "logdet": None if logdet is None else logdet.reshape(b, n)}
        if self.more_up:
            with phase("select"):  # PU-GAN's more_up: (r + more_up) N candidates, farthest-point sampled to r N
                out["candidates"] = dense
                keep = farthest_point_sample(dense, n * r)
                dense = dense.gather(1, keep[..., None].expand(-1, -1, 3))
        return {"dense": dense, **out}

    def interp_logits(self, sparse: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor, c_nb: torch.Tensor) -> torch.Tensor:
        """(B, N, r, k) logits of the convex weights."""
        b, n, k = idx.shape
        if self.interp_mode == "point":
            return self.interp(feat).reshape(b, n, self.n_sets, k)
        centre = feat[:, :, None].expand(-1, -1, k, -1)
        offset = gather(sparse, idx) - sparse[:, :, None]
        offset = offset / offset.norm(dim=-1, keepdim=True).amax(2, keepdim=True).clamp(min=1e-8)  # in k-th-neighbour units
        logits = self.interp(torch.cat([centre, c_nb - centre, offset], -1))  # (B, N, k, r)
        return (logits + self.interp_prior).transpose(2, 3)

    def target_context(self, sparse: torch.Tensor, feat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """(B M, C): each target point's context, the features of its 3 nearest sparse points (inverse-distance
        weights)."""
        b, m, _ = dense.shape
        idx = knn(sparse, 3, queries=dense)
        d = (gather(sparse, idx) - dense[:, :, None]).norm(dim=-1).clamp(min=1e-8)
        wts = (1.0 / d) / (1.0 / d).sum(-1, keepdim=True)
        return (gather(feat, idx) * wts[..., None]).sum(2).reshape(b * m, -1)

    def nll(self, sparse: torch.Tensor, feat: torch.Tensor, dense: torch.Tensor, estimator: str | None = None,
            with_parts: bool = False):
        """Negative log-likelihood (nats per point, standard normal prior on the latent) of target points
        (B, M, 3) under the flow, each conditioned on ``target_context``; ``with_parts``: also the per-point
        log-dets (B M,) and the context."""
        with phase("nll"):
            ctx = self.target_context(sparse, feat, dense)
            with phase("flow.forward"):  # the log-det inside it is its own phase
                z, logdet = self.flow(dense.reshape(-1, 3), ctx, estimator=estimator)
            log_prior = -0.5 * (z**2).sum(-1) - 1.5 * math.log(2 * math.pi)
            nll = -(log_prior + logdet).mean()
        return (nll, logdet, ctx) if with_parts else nll

    def refresh(self, n: int = 50) -> None:
        for block in self.blocks:
            block.refresh(n)
