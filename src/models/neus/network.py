"""NeuS's networks (Wang et al., NeurIPS 2021): the SDF MLP with geometric initialisation, the IDR-style
colour MLP, the single learnable variance, and (for scenes without masks) NeRF++'s background NeRF."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from src.models.nerf.network import NeRFMLP
from src.render.encoding import positional_encoding


def _wn(layer: nn.Linear, enabled: bool) -> nn.Module:
    return _weight_norm(layer) if enabled else layer


class SDFNetwork(nn.Module):
    """``n_layers`` x ``d_hidden`` Softplus(beta=100) MLP on the ``multires``-frequency encoding of
    ``scale * x``, the input concatenated again (and the sum scaled by 1/sqrt 2) before each ``skip_in``
    layer; outputs the SDF (divided by ``scale``) and a ``d_out - 1`` feature vector.

    Geometric initialisation (Atzmon & Lipman, SAL): the SDF starts close to that of a sphere of radius
    ``bias`` (positive outside): last layer weights ~ N(sqrt(pi / width), 1e-4) with bias -``bias``; first
    layer sees only the raw coordinates; the skip layer ignores the encoded part of the re-fed input.
    """

    def __init__(self, d_out: int = 257, d_hidden: int = 256, n_layers: int = 8, skip_in: tuple[int, ...] = (4,),
                 multires: int = 6, bias: float = 0.5, scale: float = 1.0, geometric_init: bool = True,
                 weight_norm: bool = True) -> None:
        super().__init__()
        self.multires, self.scale, self.skip_in = multires, scale, tuple(skip_in)
        d_in = 3 + 6 * multires
        dims = [d_in] + [d_hidden] * n_layers + [d_out]
        layers = []
        for i in range(len(dims) - 1):
            out_dim = dims[i + 1] - dims[0] if (i + 1) in self.skip_in else dims[i + 1]
            lin = nn.Linear(dims[i], out_dim)
            if geometric_init:
                std = math.sqrt(2) / math.sqrt(out_dim)
                if i == len(dims) - 2:
                    nn.init.normal_(lin.weight, mean=math.sqrt(math.pi) / math.sqrt(dims[i]), std=1e-4)
                    nn.init.constant_(lin.bias, -bias)
                elif i == 0 and multires > 0:
                    nn.init.constant_(lin.bias, 0.0)
                    nn.init.constant_(lin.weight[:, 3:], 0.0)
                    nn.init.normal_(lin.weight[:, :3], 0.0, std)
                elif i in self.skip_in and multires > 0:
                    nn.init.constant_(lin.bias, 0.0)
                    nn.init.normal_(lin.weight, 0.0, std)
                    nn.init.constant_(lin.weight[:, -(dims[0] - 3):], 0.0)
                else:
                    nn.init.constant_(lin.bias, 0.0)
                    nn.init.normal_(lin.weight, 0.0, std)
            layers.append(_wn(lin, weight_norm))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3) -> (N, d_out): column 0 the SDF, the rest the feature vector."""
        x_in = positional_encoding(x * self.scale, self.multires) if self.multires > 0 else x * self.scale
        h = x_in
        for i, layer in enumerate(self.layers):
            if i in self.skip_in:
                h = torch.cat([h, x_in], -1) / math.sqrt(2)
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.softplus(h, beta=100)
        return torch.cat([h[:, :1] / self.scale, h[:, 1:]], -1)

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[:, 0]

    def sdf_and_gradient(self, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SDF (N,), feature (N, d_out - 1) and the SDF's spatial gradient (N, 3). ``create_graph``: keep
        the gradient differentiable (the eikonal loss and the colour network's normals train through it);
        works under ``torch.no_grad`` and Lightning's inference mode too (rendering images)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # clone: a normal tensor even from inference mode
            out = self.forward(x)
            sdf = out[:, 0]
            grad, = torch.autograd.grad(sdf, x, torch.ones_like(sdf), create_graph=create_graph)
        if not create_graph:
            out, sdf = out.detach(), sdf.detach()
        return sdf, out[:, 1:], grad


class RenderingNetwork(nn.Module):
    """IDR-mode colour: MLP on [point, encoded view direction, SDF gradient (the normal), SDF feature];
    ``n_layers`` hidden ReLU layers of ``d_hidden``, sigmoid output."""

    def __init__(self, d_feature: int = 256, d_hidden: int = 256, n_layers: int = 4, multires_view: int = 4,
                 weight_norm: bool = True, squeeze_out: bool = True) -> None:
        super().__init__()
        self.multires_view, self.squeeze_out = multires_view, squeeze_out
        dims = [9 + 6 * multires_view + d_feature] + [d_hidden] * n_layers + [3]
        self.layers = nn.ModuleList([_wn(nn.Linear(dims[i], dims[i + 1]), weight_norm) for i in range(len(dims) - 1)])

    def forward(self, points, normals, view_dirs, features):
        views = positional_encoding(view_dirs, self.multires_view) if self.multires_view > 0 else view_dirs
        h = torch.cat([points, views, normals, features], -1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return torch.sigmoid(h) if self.squeeze_out else h


class SingleVariance(nn.Module):
    """The learnable sharpness: ``s = exp(10 * variance)`` (``1 / s`` is the standard deviation of the
    logistic density that turns the SDF into opacity)."""

    def __init__(self, init_val: float = 0.3) -> None:
        super().__init__()
        self.variance = nn.Parameter(torch.tensor(float(init_val)))

    def inv_s(self) -> torch.Tensor:
        return torch.exp(self.variance * 10.0).clamp(1e-6, 1e6)


class BackgroundNeRF(nn.Module):
    """NeRF++'s outside model: NeRF's MLP on the inverted-sphere parametrisation ``(x / r, 1 / r)`` of points
    beyond the unit sphere (4-D input, 10 frequencies; view directions, 4 frequencies)."""

    def __init__(self, depth: int = 8, width: int = 256, multires: int = 10, multires_view: int = 4) -> None:
        super().__init__()
        self.mlp = NeRFMLP(depth, width, skips=(4,), pe_xyz=multires, pe_dir=multires_view, d_in=4)

    def forward(self, pts: torch.Tensor, viewdirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pts (N, 3) -> rgb in [0, 1] (N, 3) and raw density (N,)."""
        r = pts.norm(dim=-1, keepdim=True).clamp(1.0, 1e10)
        raw_rgb, raw_sigma = self.mlp(torch.cat([pts / r, 1.0 / r], -1), viewdirs)
        return torch.sigmoid(raw_rgb), raw_sigma
