"""Ray banks (every training pixel's ray, held in memory as DVGO does) and deterministic ray sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from src.render.rays import get_rays


@dataclass
class RayBank:
    """Flat rays: origins (N, 3), directions (N, 3) (camera z = -1, unnormalised), target rgb (N, 3), and for rays
    warped to NDC (forward-facing scenes) the unit *world* view directions (N, 3) the colour head takes, as
    nerf-pytorch computes them before the warp (None: the directions are those of ``rays_d``)."""

    rays_o: torch.Tensor
    rays_d: torch.Tensor
    rgb: torch.Tensor
    viewdirs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.rays_o.shape[0]

    def __getitem__(self, idx: torch.Tensor) -> "RayBank":
        return RayBank(self.rays_o[idx], self.rays_d[idx], self.rgb[idx],
                       None if self.viewdirs is None else self.viewdirs[idx])

    def to(self, device: torch.device | str) -> "RayBank":
        return RayBank(self.rays_o.to(device), self.rays_d.to(device), self.rgb.to(device),
                       None if self.viewdirs is None else self.viewdirs.to(device))

    @staticmethod
    def from_views(rgb: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> "RayBank":
        """All pixels of posed images rgb (N, H, W, 3), c2w (N, 4, 4), K (3, 3) or per view (N, 3, 3)."""
        h, w = rgb.shape[1:3]
        rays = [get_rays(h, w, K[i] if K.dim() == 3 else K, pose) for i, pose in enumerate(c2w)]
        return RayBank(
            torch.stack([o for o, _ in rays]).reshape(-1, 3),
            torch.stack([d for _, d in rays]).reshape(-1, 3),
            rgb.reshape(-1, 3),
        )


class RaySampler:
    """Batches of ray indices that depend only on (seed, rank, step), so a resumed run draws what an
    uninterrupted one would.

    ``random``: i.i.d. uniform indices (DVGO's ``random`` sampler). ``permutation``: walks shuffled
    epochs of the pool without replacement (DVGO's ``flatten`` / ``in_maskcache``). ``restrict`` narrows
    the pool (e.g. to rays that hit the coarse geometry) from a given step on. Indices are drawn on
    ``device`` (a GPU's own generator there: no host round trip per step; the draws differ from a CPU's).
    """

    def __init__(self, n_rays: int, batch_size: int, seed: int, rank: int = 0, mode: str = "random",
                 device: torch.device | str = "cpu") -> None:
        if mode not in ("random", "permutation"):
            raise ValueError(f"ray sampler mode must be 'random' or 'permutation', got '{mode}'")
        self.n_rays, self.batch_size, self.mode, self.device = n_rays, batch_size, mode, torch.device(device)
        self.seed = seed * 100_003 + rank * 7_919
        self.pool: torch.Tensor | None = None
        self.pool_start = 0
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    def restrict(self, pool: torch.Tensor, from_step: int, mode: str) -> None:
        """Sample only the indices ``pool`` (1-D) from step ``from_step`` on."""
        if pool.numel() == 0:
            raise RuntimeError("ray sampler: the restricted pool is empty (no training ray hits the scene)")
        self.pool, self.pool_start, self.mode, self._perm_cache = pool.to(self.device), from_step, mode, None

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed + 1_000_003 * key)

    def _permutation(self, epoch: int, size: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, torch.randperm(size, generator=self._generator(-1 - epoch), device=self.device))
        return self._perm_cache[1]

    def indices(self, step: int) -> torch.Tensor:
        size = self.n_rays if self.pool is None else self.pool.numel()
        local_step = step - self.pool_start
        if self.mode == "random":
            idx = torch.randint(size, (self.batch_size,), generator=self._generator(step), device=self.device)
        else:
            epoch, offset = divmod(local_step * self.batch_size, size)
            parts, remaining = [], self.batch_size
            while remaining > 0:
                take = min(size - offset, remaining)
                parts.append((epoch, offset, offset + take))
                epoch, offset, remaining = epoch + 1, 0, remaining - take
            idx = torch.cat([self._permutation(e, size)[a:b] for e, a, b in parts])
        return idx if self.pool is None else self.pool[idx]
