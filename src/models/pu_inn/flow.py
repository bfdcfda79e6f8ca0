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
  ``(I + J)^-1`` (one graph of ``g`` kept instead of one per term: memory-light training); the value comes
  from the same vector-Jacobian products (one series, not two).

The random estimators draw the number of terms per point (``N_i = n_exact_terms + Poisson(lam)``), so a
batch mean averages as many independent draws as it has points; with one draw per batch, all points shared
one series length and the batch mean swung with it.

The inverse ``x = y - g(x; c)`` is solved by fixed-point iteration without a graph; its gradient is the
implicit one, ``dx/dy = (I + J_g)^-1`` at the solution (``inverse_grad="implicit"``): one graph of ``g`` at the
solution, the incoming gradient ``u`` replaced by ``(I + J_g)^-T u``, solved exactly per point (g's
Jacobian by the chain rule through its layers: 3 x 3 here). ``"unrolled"`` keeps
the older truncation (``inverse_grad_steps`` iterations with a graph: the first terms of the Neumann series,
relative error up to ``Lip(g)^steps``), for comparison.

A block's estimator is chosen separately for training and evaluation (PU-INN's ``validation_step`` runs its
own log-det estimation). Estimation needs gradients, so it runs under ``torch.enable_grad`` even inside
``no_grad`` and Lightning's inference mode is turned off for methods built on these blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.phases import phase

ESTIMATORS = ("exact", "exact_trace", "fixed", "poisson", "geometric")
INVERSE_GRADS = ("implicit", "unrolled")


def check_estimator(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown log-det estimator '{name}' (one of {', '.join(ESTIMATORS)})")
    return name


class SpectralNormLinear(nn.Linear):
    """A linear map rescaled so that its spectral norm is at most ``coeff``: ``W / max(1, sigma / coeff)``.

    ``exact_norm`` (default): sigma is the exact largest singular value (``matrix_norm(W, 2)``, differentiable;
    these maps are at most a few hundred wide), computed once per weight update for the graph-free calls (the
    inverse's fixed-point iterations) and with a graph for the others. Power iteration (``exact_norm=False``,
    ``n_iterations`` per training forward from persistent vectors; ``refresh`` runs many) underestimates sigma
    while Adam turns the weights faster than one iteration a step follows: measured on the real-mesh patches,
    the product of a block's normalised norms passed 1 within 150 steps (g no longer a contraction, the inverse
    no longer converging), where 0.97^3 = 0.913 was the design."""

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, n_iterations: int = 1,
                 bias: bool = True, exact_norm: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.coeff, self.n_iterations, self.exact_norm = coeff, n_iterations, exact_norm
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))
        self._sigma: tuple[tuple[int, int], torch.Tensor] | None = None

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
        """Converge the power-iteration vectors (nothing to do with exact norms)."""
        if not self.exact_norm:
            self.power_iteration(n)

    def sigma(self) -> torch.Tensor:
        if not self.exact_norm:
            if self.training and self.n_iterations > 0 and torch.is_grad_enabled():
                self.power_iteration(self.n_iterations)
            # clones: later power iterations update u, v in place while this graph still needs them
            return torch.dot(self.u.clone(), self.weight @ self.v.clone())
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return torch.linalg.matrix_norm(self.weight, 2)
        key = (self.weight._version, self.weight.data_ptr())
        if self._sigma is None or self._sigma[0] != key:
            self._sigma = (key, torch.linalg.matrix_norm(self.weight.detach(), 2))
        return self._sigma[1]

    def effective_weight(self) -> torch.Tensor:
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)

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
        lam, p: the Russian-roulette draw. roulette: ``point`` (a series length per point) or ``batch`` (one per
        call, all points sharing it: the older behaviour, for comparison). neumann_grad: Neumann-series gradient in training (random
        estimators). n_samples: Hutchinson vectors per point. inverse_iters, inverse_atol, newton_iters: the inverse
        (``solve_inverse``).
    """

    def __init__(self, dim: int, hidden: int = 64, n_layers: int = 3, coeff: float = 0.97,
                 estimator: str = "poisson", eval_estimator: str = "poisson", n_terms: int = 10,
                 n_exact_terms: int = 2, lam: float = 2.0, p: float = 0.5, neumann_grad: bool = True,
                 n_samples: int = 1, inverse_iters: int = 100, inverse_atol: float = 1e-5,
                 n_power_iterations: int = 1, context_dim: int = 0, inverse_grad: str = "implicit",
                 inverse_grad_steps: int = 5, roulette: str = "point", newton_iters: int = 10) -> None:
        super().__init__()
        for name in (estimator, eval_estimator):
            check_estimator(name)
        if inverse_grad not in INVERSE_GRADS:
            raise ValueError(f"unknown inverse gradient '{inverse_grad}' (one of {', '.join(INVERSE_GRADS)})")
        self.inverse_grad, self.inverse_grad_steps = inverse_grad, int(inverse_grad_steps)
        if roulette not in ("point", "batch"):
            raise ValueError(f"roulette must be 'point' or 'batch' (one series length per call), got {roulette!r}")
        self.roulette = roulette
        self.newton_iters = int(newton_iters)
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

    def _check_context(self, context: torch.Tensor | None) -> None:
        if self.context_dim and context is None:
            raise ValueError(f"this block is conditioned on a context of size {self.context_dim}: pass it")

    def g_of(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_context(context)
        return self.g(torch.cat([x, context], -1)) if self.context_dim else self.g(x)

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
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, with_logdet: bool = True,
                estimator: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, dim) [, context (N, context_dim)] -> y (N, dim) and log|det dy/dx| (N,) (None without
        ``with_logdet``), by ``estimator`` (default: the block's training or evaluation estimator)."""
        if not with_logdet:
            return x + self.g_of(x, context), None
        name = check_estimator(estimator) if estimator else (self.estimator if self.training else self.eval_estimator)
        create_graph = self.training and torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            xg = x if x.requires_grad else x.clone().requires_grad_(True)
            if context is not None and torch.is_inference(context):
                context = context.clone()  # a normal tensor: it takes part in the graph of the log-det
            gx = self.g_of(xg, context)
            with phase("logdet"):
                logdet = self.logdet(xg, gx, name, create_graph)
        if not create_graph:
            gx, logdet = gx.detach(), logdet.detach()
        return x + gx, logdet

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, grad: str | None = None,
                grad_steps: int | None = None) -> torch.Tensor:
        """x with x + g(x; c) = y by the fixed point x <- y - g(x; c) (a contraction: converges geometrically),
        iterated without a graph. When gradients are on, they reach y, c and g's parameters by ``grad``
        (default the block's ``inverse_grad``): ``implicit``, the exact ``(I + J_g)^-1`` at the solution, or
        ``unrolled``, ``grad_steps`` more iterations with the graph (a truncated Neumann series)."""
        with torch.no_grad():
            x = self.solve_inverse(y, context)
        if not torch.is_grad_enabled():
            return x
        grad = grad or self.inverse_grad
        if grad == "unrolled":
            for _ in range(self.inverse_grad_steps if grad_steps is None else grad_steps):
                x = y - self.g_of(x, context)
            return x
        if grad != "implicit":
            raise ValueError(f"unknown inverse gradient '{grad}' (one of {', '.join(INVERSE_GRADS)})")
        # one step from the solution with a graph: d/dy = I and d/dtheta = -dg/dtheta, as the implicit gradient
        # needs once the incoming gradient u is replaced by w = (I + J_g)^-T u (the hook below)
        x0 = x.detach().requires_grad_(True)
        with torch.enable_grad():
            gx0 = self.g_of(x0, context)
        out = y - gx0
        if out.requires_grad:
            out.register_hook(lambda u: self._implicit_adjoint(u, x0.detach(), context))
        return out

    @torch.no_grad()
    def solve_inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The x with x + g(x; c) = y, per point: Newton's method on the 3-D residual (g's Jacobian by the chain
        rule through its layers, ``I + J`` always invertible as ``Lip(g) < 1``), each point until its step is
        below ``inverse_atol``; points Newton has not settled in ``newton_iters`` steps finish by the
        fixed-point iteration x <- y - g(x; c) (a contraction: it always converges, geometrically, at most
        ``inverse_iters`` steps). Trained blocks sit near their Lipschitz cap (0.97^3), where the fixed point
        needs 30-75 steps to 1e-5 and Newton 3-5."""
        g, g_jac = self._g_at(context)
        x = y - g(y, None)
        active = torch.arange(y.shape[0], device=y.device)
        eye = torch.eye(y.shape[1], device=y.device, dtype=y.dtype)
        for _ in range(self.newton_iters):
            gx, J = g_jac(x[active], active)
            step = torch.linalg.solve(eye + J, (x[active] + gx - y[active]).unsqueeze(-1)).squeeze(-1)
            x[active] = x[active] - step
            active = active[step.abs().amax(-1) >= self.inverse_atol]
            if active.numel() == 0:
                return x
        for _ in range(self.inverse_iters):
            x_new = y[active] - g(x[active], active)
            moving = (x_new - x[active]).abs().amax(-1) >= self.inverse_atol
            x[active] = x_new
            active = active[moving]
            if active.numel() == 0:
                break
        return x

    def _g_at(self, context: torch.Tensor | None):
        """For a fixed context, without a graph: g(x rows, row indices) and (g, dg/dx) of those rows, g's first
        map split into the x part and a precomputed context part."""
        layers = list(self.g)
        first = layers[0]
        w = first.effective_weight()
        self._check_context(context)
        pre = first.bias if first.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        if self.context_dim:
            pre = F.linear(context, w[:, -self.context_dim:]) + pre
        wx = w[:, : w.shape[1] - self.context_dim]
        rest = [(m, m.effective_weight() if isinstance(m, SpectralNormLinear) else None) for m in layers[1:]]

        def first_map(x, rows):
            return F.linear(x, wx) + (pre[rows] if rows is not None and self.context_dim else pre)

        def g(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            h = first_map(x, rows)
            for m, wm in rest:
                h = F.linear(h, wm, m.bias) if wm is not None else m(h)
            return h

        def g_jac(x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            h = first_map(x, rows)
            # the Jacobian transposed, (N, d, width): each linear map is then one (N d, width) x (width, width')
            # product instead of N small ones
            jac_t = wx.t().contiguous().expand(x.shape[0], -1, -1)
            for m, wm in rest:
                if wm is not None:
                    h, jac_t = F.linear(h, wm, m.bias), F.linear(jac_t.contiguous(), wm)
                else:  # LipSwish: x sigmoid(beta x) / 1.1, derivative (s + beta x s (1 - s)) / 1.1
                    beta = F.softplus(m.raw_beta)
                    sig = torch.sigmoid(beta * h)
                    jac_t = ((sig + beta * h * sig * (1 - sig)) / 1.1).unsqueeze(1) * jac_t
                    h = h * sig / 1.1
            return h, jac_t.transpose(1, 2)
        return g, g_jac

    def _implicit_adjoint(self, u: torch.Tensor, x0: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """w with (I + J_g(x0))^T w = u, row by row (per-point maps), by the Jacobian of ``_g_at``."""
        with torch.no_grad():
            J = self._g_at(context)[1](x0, None)[1]  # (N, d, d)
            eye = torch.eye(x0.shape[1], device=x0.device, dtype=x0.dtype)
            return torch.linalg.solve((eye + J).transpose(1, 2), u.unsqueeze(-1)).squeeze(-1)

    # ---- log-determinant estimators ------------------------------------------------------------------
    def _term_weights(self, name: str, n_points: int, device=None, dtype=None) -> torch.Tensor:
        """(n_points, K): the weight of series term k = 1..K (column 0 is k = 1) for each point's own draw of
        the series length (zero past it); a fixed series: ones, K = n_terms."""
        if name in ("fixed", "exact_trace"):
            return torch.ones(n_points, self.n_terms, device=device, dtype=dtype)
        draws = n_points if self.roulette == "point" else 1
        if name == "poisson":
            extra = torch.poisson(torch.full((draws,), float(self.lam)))
            tail = lambda m: _poisson_tail(self.lam, m)  # noqa: E731
        else:
            extra = torch.distributions.Geometric(probs=torch.tensor(float(self.p))).sample((draws,))
            tail = lambda m: _geometric_tail(self.p, m)  # noqa: E731
        extra = extra.expand(n_points)
        counts = self.n_exact_terms + extra.long()
        k = torch.arange(1, int(counts.max()) + 1)
        scale = torch.tensor([1.0 if j <= self.n_exact_terms else 1.0 / tail(j - self.n_exact_terms) for j in k.tolist()],
                             dtype=torch.float64)
        weights = (k[None] <= counts[:, None]).double() * scale[None]
        return weights.to(device=device, dtype=dtype)

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
        estimates = []
        for _ in range(self.n_samples):
            weights = self._term_weights(name, x.shape[0], x.device, x.dtype)
            v = torch.randn_like(x)
            if self.neumann_grad and create_graph and name in ("poisson", "geometric"):
                estimates.append(_neumann_logdet(x, gx, v, weights))
            else:
                estimates.append(_series_logdet(x, gx, v, weights, create_graph))
        return torch.stack(estimates).mean(0)


def batch_jacobian(gx: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d gx_i / d x_i for every row i (rows independent, as for per-point maps): (N, d_out, d_in). One
    vector-Jacobian product per output dimension, with one-hot vectors (no new op on ``gx``: this also works
    inside a backward hook, where grad mode is off)."""
    rows = []
    for j in range(gx.shape[1]):
        onehot = torch.zeros_like(gx)
        onehot[:, j] = 1.0
        rows.append(torch.autograd.grad(gx, x, onehot, create_graph=create_graph, retain_graph=True)[0])
    return torch.stack(rows, 1)


def _series_logdet(x, gx, v, weights: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Hutchinson: ``sum_k (-1)^(k+1) / k * w_k * v^T J^k v`` per row, ``v^T J^k`` by repeated vector-Jacobian
    products; ``weights`` (N, K) per row and term."""
    total, w = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype), v
    for k in range(1, weights.shape[1] + 1):
        w = torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]
        total = total + (-1) ** (k + 1) / k * weights[:, k - 1] * (w * v).sum(-1)
    return total


def _neumann_logdet(x, gx, v, weights: torch.Tensor) -> torch.Tensor:
    """The Russian-roulette value, with the gradient of the Neumann estimator of d log det / d theta:
    ``v^T (sum_k (-1)^k w_k J^k) dJ/dtheta v``. One pass of vector-Jacobian products ``v^T J^k`` (no graph)
    gives both the value's terms and the Neumann vector; one graph of g's vector-Jacobian product is built."""
    value = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    neumann, w = v.clone(), v
    for k in range(1, weights.shape[1] + 1):
        w = torch.autograd.grad(gx, x, w, retain_graph=True)[0].detach()
        wk = weights[:, k - 1]
        value = value + (-1) ** (k + 1) / k * wk * (w * v).sum(-1)
        neumann = neumann + (-1) ** k * wk[:, None] * w
    surrogate = (torch.autograd.grad(gx, x, neumann, create_graph=True, retain_graph=True)[0] * v).sum(-1)
    return value + surrogate - surrogate.detach()
