"""Residual flows (Behrmann et al., i-ResNet, ICML 2019; Chen et al., Residual Flows, NeurIPS 2019): blocks
``y = x + g(x)`` with ``g`` contractive (spectral normalisation of every linear map, 1-Lipschitz LipSwish
activations), inverted by fixed-point iteration, with ``log |det(I + J_g)|`` from the power series
``sum_k (-1)^(k+1) / k tr(J_g^k)``:

- ``exact``: ``slogdet(I + J_g)`` of the full Jacobian (brute force; small dimensions only).
- ``exact_trace``: the series truncated at ``n_terms`` with exact traces of the powers of the full Jacobian.
- ``fixed``: Hutchinson's trace estimator (``v^T J^k v`` by vector-Jacobian products) truncated at ``n_terms``
  (biased by the truncation).
- ``poisson`` / ``geometric``: Hutchinson with a random number of terms (``n_exact_terms`` plus a Poisson(lam)
  or Geometric(p) draw), term k reweighted by ``1 / P(N >= k - n_exact_terms)``: the "Russian roulette"
  estimator, unbiased for the infinite series.
- ``neumann_grad``: with a random estimator, the gradient comes from the Neumann series of
  ``(I + J)^-1`` (one graph of ``g`` kept instead of one per term: memory-light training), the value from
  the same estimator under ``no_grad``.

A block's estimator is chosen separately for training and evaluation (seed 001's ``validation_step`` ran its
own log-det estimation). Estimation needs gradients, so it runs under ``torch.enable_grad`` even inside
``no_grad`` and Lightning's inference mode is turned off for methods built on these blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ESTIMATORS = ("exact", "exact_trace", "fixed", "poisson", "geometric")


class SpectralNormLinear(nn.Linear):
    """A linear map rescaled so that its spectral norm is at most ``coeff``: ``W / max(1, sigma / coeff)``
    with ``sigma`` estimated by power iteration (``n_iterations`` per training forward; ``refresh`` runs many,
    e.g. before validation)."""

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, n_iterations: int = 1,
                 bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.coeff, self.n_iterations = coeff, n_iterations
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))

    @torch.no_grad()
    def power_iteration(self, n: int) -> None:
        w = self.weight
        u, v = self.u, self.v
        for _ in range(n):
            v = F.normalize(w.t() @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.u.copy_(u)
        self.v.copy_(v)

    def refresh(self, n: int = 200) -> None:
        self.power_iteration(n)

    def effective_weight(self) -> torch.Tensor:
        if self.training and self.n_iterations > 0 and torch.is_grad_enabled():
            self.power_iteration(self.n_iterations)
        # clones: later power iterations update u, v in place while this graph still needs them
        sigma = torch.dot(self.u.clone(), self.weight @ self.v.clone())
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class LipSwish(nn.Module):
    """``x sigmoid(beta x) / 1.1``, 1-Lipschitz for every beta > 0 (beta = softplus of a learnt parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(F.softplus(self.raw_beta) * x) / 1.1


def _poisson_tail(lam: float, m: int) -> float:
    """P(N >= m) for N ~ Poisson(lam)."""
    return 1.0 - sum(math.exp(-lam) * lam**j / math.factorial(j) for j in range(m))


def _geometric_tail(p: float, m: int) -> float:
    """P(N >= m) for N ~ Geometric(p) counting failures before the first success (support 0, 1, ...)."""
    return (1.0 - p) ** m


class ResidualBlock(nn.Module):
    """``y = x + g(x; c)``, ``g`` an MLP of spectrally normalised linear maps on ``[x, c]`` (Lipschitz in x at
    most coeff^layers < 1, whatever the context c: the flow stays invertible for every c).

    Args: dim: features per point. context_dim: size of the conditioning vector c (0: none). hidden,
        n_layers: g's width and number of linear maps. coeff: spectral
        norm bound of each map. estimator / eval_estimator: the log-det estimator for training / evaluation
        (one of ``ESTIMATORS``). n_terms: series length for ``exact_trace`` and ``fixed``. n_exact_terms,
        lam, p: the Russian-roulette draw. neumann_grad: Neumann-series gradient in training (random
        estimators). n_samples: Hutchinson vectors per point. inverse_iters, inverse_atol: fixed point.
    """

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 3, coeff: float = 0.97,
                 estimator: str = "poisson", eval_estimator: str = "poisson", n_terms: int = 10,
                 n_exact_terms: int = 2, lam: float = 2.0, p: float = 0.5, neumann_grad: bool = True,
                 n_samples: int = 1, inverse_iters: int = 100, inverse_atol: float = 1e-6,
                 n_power_iterations: int = 1, context_dim: int = 0) -> None:
        super().__init__()
        for name in (estimator, eval_estimator):
            if name not in ESTIMATORS:
                raise ValueError(f"unknown log-det estimator '{name}' (one of {', '.join(ESTIMATORS)})")
        dims = [dim + context_dim] + [hidden] * (n_layers - 1) + [dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(SpectralNormLinear(dims[i], dims[i + 1], coeff, n_power_iterations))
            if i < n_layers - 1:
                layers.append(LipSwish())
        self.g = nn.Sequential(*layers)
        self.estimator, self.eval_estimator = estimator, eval_estimator
        self.n_terms, self.n_exact_terms, self.lam, self.p = n_terms, n_exact_terms, lam, p
        self.neumann_grad, self.n_samples = neumann_grad, n_samples
        self.inverse_iters, self.inverse_atol = inverse_iters, inverse_atol
        self.context_dim = context_dim

    def g_of(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_dim:
            if context is None:
                raise ValueError(f"this block is conditioned on a context of size {self.context_dim}: pass it")
            return self.g(torch.cat([x, context], -1))
        return self.g(x)

    def refresh(self, n: int = 200) -> None:
        """Converge the spectral-norm estimates (call before evaluation)."""
        for m in self.g:
            if isinstance(m, SpectralNormLinear):
                m.refresh(n)

    def lipschitz_bound(self) -> float:
        """Product of the exact spectral norms of g's (normalised) linear maps: an upper bound of Lip(g)."""
        bound = 1.0
        with torch.no_grad():
            for m in self.g:
                if isinstance(m, SpectralNormLinear):
                    bound *= float(torch.linalg.matrix_norm(m.effective_weight(), 2))
        return bound

    # ---- forward / inverse ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                with_logdet: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, dim) [, context (N, context_dim)] -> y (N, dim) and log|det dy/dx| (N,) (None without
        ``with_logdet``)."""
        if not with_logdet:
            return x + self.g_of(x, context), None
        name = self.estimator if self.training else self.eval_estimator
        create_graph = self.training and torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            xg = x if x.requires_grad else x.clone().requires_grad_(True)
            if context is not None and torch.is_inference(context):
                context = context.clone()  # a normal tensor: it takes part in the graph of the log-det
            gx = self.g_of(xg, context)
            logdet = self.logdet(xg, gx, name, create_graph)
        if not create_graph:
            gx, logdet = gx.detach(), logdet.detach()
        return x + gx, logdet

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, grad_steps: int = 0) -> torch.Tensor:
        """x with x + g(x; c) = y by the fixed point x <- y - g(x; c) (a contraction: converges geometrically),
        iterated without a graph. ``grad_steps`` > 0: that many more iterations with the graph, from the
        converged point, so gradients reach y, c and g's parameters (the first ``grad_steps`` terms of the
        Neumann series of the implicit gradient ``(I + J)^-1``)."""
        with torch.no_grad():
            x = y - self.g_of(y, context)
            for _ in range(self.inverse_iters):
                x_new = y - self.g_of(x, context)
                done = (x_new - x).abs().max() < self.inverse_atol
                x = x_new
                if done:
                    break
        for _ in range(grad_steps):
            x = y - self.g_of(x, context)
        return x

    # ---- log-determinant estimators ------------------------------------------------------------------
    def _term_weights(self, name: str, generator: torch.Generator | None = None) -> list[float]:
        """The weight of each series term k = 1..n (index 0 is k = 1) for this draw."""
        if name in ("fixed", "exact_trace"):
            return [1.0] * self.n_terms
        if name == "poisson":
            n = self.n_exact_terms + int(torch.poisson(torch.tensor(float(self.lam)), generator=generator))
            tail = lambda m: _poisson_tail(self.lam, m)  # noqa: E731
        else:
            n = self.n_exact_terms + int(torch.distributions.Geometric(probs=torch.tensor(self.p)).sample())
            tail = lambda m: _geometric_tail(self.p, m)  # noqa: E731
        return [1.0 if k <= self.n_exact_terms else 1.0 / tail(k - self.n_exact_terms) for k in range(1, n + 1)]

    def logdet(self, x: torch.Tensor, gx: torch.Tensor, name: str, create_graph: bool) -> torch.Tensor:
        """log|det(I + dg/dx)| per row of x (N,), by the estimator ``name``; ``x`` requires grad, ``gx = g(x)``."""
        if name in ("exact", "exact_trace"):
            J = batch_jacobian(gx, x, create_graph)  # (N, d, d)
            if name == "exact":
                return torch.linalg.slogdet(torch.eye(x.shape[1], device=x.device, dtype=x.dtype) + J)[1]
            total, Jk = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), J
            for k in range(1, self.n_terms + 1):
                total = total + (-1) ** (k + 1) / k * Jk.diagonal(dim1=1, dim2=2).sum(-1)
                Jk = Jk @ J
            return total
        weights = self._term_weights(name)
        estimates = []
        for _ in range(self.n_samples):
            v = torch.randn_like(x)
            if self.neumann_grad and create_graph and name in ("poisson", "geometric"):
                estimates.append(_neumann_logdet(x, gx, v, weights))
            else:
                estimates.append(_series_logdet(x, gx, v, weights, create_graph))
        return torch.stack(estimates).mean(0)


def batch_jacobian(gx: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d gx_i / d x_i for every row i (rows independent, as for per-point maps): (N, d_out, d_in)."""
    rows = [torch.autograd.grad(gx[:, j].sum(), x, create_graph=create_graph, retain_graph=True)[0]
            for j in range(gx.shape[1])]
    return torch.stack(rows, 1)


def _series_logdet(x, gx, v, weights, create_graph: bool) -> torch.Tensor:
    """Hutchinson: ``sum_k (-1)^(k+1) / k * w_k * v^T J^k v`` with ``v^T J^k`` by repeated vector-Jacobian products."""
    total, w = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), v
    for k, weight in enumerate(weights, start=1):
        w = torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]
        total = total + (-1) ** (k + 1) / k * weight * (w * v).sum(-1)
    return total


def _neumann_logdet(x, gx, v, weights) -> torch.Tensor:
    """The Russian-roulette value, with the gradient of the Neumann estimator of d log det / d theta:
    ``v^T (sum_k (-1)^k w_k J^k) dJ/dtheta v``; only one graph of g's vector-Jacobian product is built."""
    with torch.no_grad():
        value = _series_logdet(x, gx, v, weights, create_graph=False)
        neumann, w = v.clone(), v
    for k, weight in enumerate(weights, start=1):
        w = torch.autograd.grad(gx, x, w, retain_graph=True)[0].detach()
        neumann = neumann + (-1) ** k * weight * w
    surrogate = (torch.autograd.grad(gx, x, neumann, create_graph=True, retain_graph=True)[0] * v).sum(-1)
    return value + surrogate - surrogate.detach()
