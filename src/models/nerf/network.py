"""NeRF's MLP (Mildenhall et al., ECCV 2020): positional encoding, 8 x 256 ReLU layers with the encoded
input concatenated again after layer 4, density from the trunk, view-dependent colour from a 128-wide head."""
from __future__ import annotations

import torch
import torch.nn as nn

from src.render.encoding import positional_encoding


class NeRFMLP(nn.Module):
    def __init__(self, depth: int = 8, width: int = 256, skips: tuple[int, ...] = (4,), pe_xyz: int = 10,
                 pe_dir: int = 4, use_viewdirs: bool = True, d_in: int = 3) -> None:
        super().__init__()
        self.pe_xyz, self.pe_dir, self.skips, self.use_viewdirs = pe_xyz, pe_dir, tuple(skips), use_viewdirs
        in_xyz, in_dir = d_in * (1 + 2 * pe_xyz), 3 + 6 * pe_dir  # d_in: 3, or 4 for NeRF++'s (x / r, 1 / r)
        layers = [nn.Linear(in_xyz, width)]
        for i in range(1, depth):
            layers.append(nn.Linear(width + (in_xyz if (i - 1) in self.skips else 0), width))
        self.trunk = nn.ModuleList(layers)
        if use_viewdirs:
            self.sigma = nn.Linear(width, 1)
            self.feature = nn.Linear(width, width)
            self.view = nn.Linear(width + in_dir, width // 2)
            self.rgb = nn.Linear(width // 2, 3)
        else:
            self.out = nn.Linear(width, 4)

    def forward(self, pts: torch.Tensor, viewdirs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """pts (N, 3), unit viewdirs (N, 3) -> raw rgb (N, 3) (pre-sigmoid) and raw density (N,) (pre-ReLU)."""
        x_in = positional_encoding(pts, self.pe_xyz)
        h = x_in
        for i, layer in enumerate(self.trunk):
            h = torch.relu(layer(h))
            if i in self.skips:
                h = torch.cat([x_in, h], -1)
        if not self.use_viewdirs:
            out = self.out(h)
            return out[:, :3], out[:, 3]
        sigma = self.sigma(h)[:, 0]
        h = torch.relu(self.view(torch.cat([self.feature(h), positional_encoding(viewdirs, self.pe_dir)], -1)))
        return self.rgb(h), sigma
