"""NeuS (Wang et al., NeurIPS 2021) as a LightningModule: an SDF turned into opacity by NeuS's unbiased
logistic-density weights, 64 coarse samples up-sampled in 4 steps (64 more) from the SDF, optional NeRF++
background, eikonal and mask losses, learning-rate warm-up then cosine decay, cosine annealing of the
SDF-to-alpha slope. Everything runs in the normalised space of the data (the region of interest is the unit
sphere); meshes are mapped back to world coordinates with the data's ``scale_mat``."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from src.config import check_positive
from src.models.rendering import RayMethod
from src.models.neus.network import BackgroundNeRF, RenderingNetwork, SDFNetwork, SingleVariance
from src.phases import PhaseHooks, phase
from src.render.compositing import dense_weights
from src.render.rays import rays_through
from src.render.sampling import sample_pdf

log = logging.getLogger(__name__)


def near_far_from_sphere(rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeuS's bounds for unit directions: 1 either side of the point of the ray closest to the origin."""
    mid = -(rays_o * rays_d).sum(-1)
    return mid - 1.0, mid + 1.0


def upsample_weights(z: torch.Tensor, sdf: torch.Tensor, rays_o: torch.Tensor, rays_d: torch.Tensor,
                     inv_s: float) -> torch.Tensor:
    """NeuS's weights (n, S - 1) of the intervals between samples ``z`` (n, S) for importance sampling,
    from SDF values at the samples: the SDF slope of each interval (the smaller of it and its predecessor's,
    clipped to [-1e3, 0]; 0 outside the unit sphere) gives SDF estimates at both ends, and the logistic CDF
    of those with sharpness ``inv_s`` gives each interval's opacity."""
    pts = rays_o[:, None] + rays_d[:, None] * z[..., None]
    radius = pts.norm(dim=-1)
    inside = ((radius[:, :-1] < 1.0) | (radius[:, 1:] < 1.0)).to(z.dtype)
    prev_sdf, next_sdf = sdf[:, :-1], sdf[:, 1:]
    dist = z[:, 1:] - z[:, :-1]
    mid_sdf = 0.5 * (prev_sdf + next_sdf)
    cos = (next_sdf - prev_sdf) / (dist + 1e-5)
    cos = torch.minimum(torch.cat([torch.zeros_like(cos[:, :1]), cos[:, :-1]], -1), cos)
    cos = cos.clamp(-1e3, 0.0) * inside
    prev_cdf = torch.sigmoid((mid_sdf - cos * dist * 0.5) * inv_s)
    next_cdf = torch.sigmoid((mid_sdf + cos * dist * 0.5) * inv_s)
    alpha = (prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)
    return dense_weights(alpha, eps=1e-7)


def neus_alpha(sdf: torch.Tensor, grad: torch.Tensor, dirs: torch.Tensor, dists: torch.Tensor,
               inv_s: torch.Tensor, cos_anneal_ratio: float) -> torch.Tensor:
    """NeuS's discrete opacity of each section (flat (M,) inputs): SDF estimates at the section's ends from
    the SDF at its middle and the slope ``cos = dir . grad`` (annealed from ``-relu(-cos / 2 + 1 / 2)`` to
    ``-relu(-cos)``), then ``alpha = (Phi(prev) - Phi(next)) / Phi(prev)`` with the logistic CDF Phi."""
    true_cos = (dirs * grad).sum(-1)
    iter_cos = -(F.relu(-true_cos * 0.5 + 0.5) * (1.0 - cos_anneal_ratio) + F.relu(-true_cos) * cos_anneal_ratio)
    prev_cdf = torch.sigmoid((sdf - iter_cos * dists * 0.5) * inv_s)
    next_cdf = torch.sigmoid((sdf + iter_cos * dists * 0.5) * inv_s)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)


class NeuSModule(PhaseHooks, RayMethod):
    """Args (``conf/model/neus.yaml``: NeuS's published ``wmask.conf``):
        batch_size: rays per step, all from one image (NeuS cycles through shuffled images).
        n_samples, n_importance, up_sample_steps: coarse samples, extra samples added over the steps.
        n_outside: samples of the NeRF++ background beyond the unit sphere (0: no background model).
        perturb: jitter the coarse samples while training.
        lr, lr_alpha, warm_up_end, end_iter: linear warm-up to ``lr``, then cosine decay to ``lr * lr_alpha``.
        anneal_end: steps over which the alpha slope goes from "half-cosine" to the true cosine (0: off).
        igr_weight, mask_weight: eikonal and mask (BCE of the opacity) loss weights.
        sdf, rendering, variance_init, nerf: the networks (see ``network.py``).
        background: colour of empty space (0: black, as DTU masks; the NeRF++ model replaces it).
        chunk: rays per forward when rendering images. mesh_resolution, mesh_threshold: the mesh written
            after testing by the ``mesh`` callback (0: none).
        render_path_frames: after testing, this many frames of an orbit about the scene's up axis into
            ``render_path.mp4`` (rgb | depth) in the run dir (0: off).
    """

    #: the scores the method is judged by (sweep summaries; the first is what a sweep optimises by default)
    key_metrics = ("test/psnr", "mesh/chamfer", "mesh/fscore")
    steps_key, rays_key, meshes = "end_iter", "batch_size", True

    def __init__(self, batch_size: int = 512, n_samples: int = 64, n_importance: int = 64, up_sample_steps: int = 4,
                 n_outside: int = 0, perturb: float = 1.0, lr: float = 5e-4, lr_alpha: float = 0.05,
                 warm_up_end: int = 5000, end_iter: int = 300000, anneal_end: int = 0, igr_weight: float = 0.1,
                 mask_weight: float = 0.1, sdf: dict | None = None, rendering: dict | None = None,
                 variance_init: float = 0.3, nerf: dict | None = None, background: float = 0.0, chunk: int = 512,
                 mesh_resolution: int = 512, mesh_threshold: float = 0.0, seed: int = 0,
                 render_path_frames: int = 0) -> None:
        super().__init__()
        check_positive("model", batch_size=batch_size, n_samples=n_samples, end_iter=end_iter, chunk=chunk)
        self.save_hyperparameters(logger=False)  # the loggers get the composed config once (pipeline.run)
        self.sdf_net = SDFNetwork(**(sdf or {}))
        self.color_net = RenderingNetwork(**(rendering or {}))
        self.variance = SingleVariance(variance_init)
        self.nerf_outside = BackgroundNeRF(**(nerf or {})) if n_outside > 0 else None
        self.train_views = None

    # ---- schedules ----------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        hp = self.hparams
        if step < hp.warm_up_end:
            return step / hp.warm_up_end
        progress = (step - hp.warm_up_end) / max(1, hp.end_iter - hp.warm_up_end)
        return (math.cos(math.pi * min(progress, 1.0)) + 1.0) * 0.5 * (1 - hp.lr_alpha) + hp.lr_alpha

    def cos_anneal_ratio(self) -> float:
        end = self.hparams.anneal_end
        return 1.0 if end == 0 else min(1.0, self.global_step / end)  # as NeuS: validation uses it too

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor),
                                                    "interval": "step"}}

    # ---- rendering ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _upsample(self, rays_o, rays_d, z: torch.Tensor) -> torch.Tensor:
        """The coarse depths plus ``n_importance`` more, added in ``up_sample_steps`` rounds with sharpness
        64 * 2^i, each round's samples drawn from the weights of the SDF at the current samples."""
        hp = self.hparams
        n, s = z.shape
        sdf = self.sdf_net.sdf((rays_o[:, None] + rays_d[:, None] * z[..., None]).reshape(-1, 3)).reshape(n, s)
        per_step = hp.n_importance // hp.up_sample_steps
        for i in range(hp.up_sample_steps):
            weights = upsample_weights(z, sdf, rays_o, rays_d, 64 * 2**i)
            z_new = sample_pdf(z, weights, per_step, det=True, midpoints=True)
            z, order = torch.sort(torch.cat([z, z_new], -1), -1)
            if i + 1 < hp.up_sample_steps:
                pts = rays_o[:, None] + rays_d[:, None] * z_new[..., None]
                sdf_new = self.sdf_net.sdf(pts.reshape(-1, 3)).reshape(n, per_step)
                sdf = torch.cat([sdf, sdf_new], -1).gather(-1, order)
        return z

    def _background(self, rays_o, rays_d, z_all: torch.Tensor, sample_dist: float):
        """NeRF++ colours and opacities at every sample (inside and outside the sphere), (n, S, 3) and (n, S)."""
        n, s = z_all.shape
        dists = torch.cat([z_all[:, 1:] - z_all[:, :-1], torch.full_like(z_all[:, :1], sample_dist)], -1)
        mid_z = z_all + dists * 0.5
        pts = (rays_o[:, None] + rays_d[:, None] * mid_z[..., None]).reshape(-1, 3)
        dirs = rays_d[:, None].expand(n, s, 3).reshape(-1, 3)
        rgb, sigma = self.nerf_outside(pts, dirs)
        alpha = 1.0 - torch.exp(-F.softplus(sigma.reshape(n, s)) * dists)
        return rgb.reshape(n, s, 3), alpha

    def render_rays(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
                    viewdirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Render (n, 3) world rays (``viewdirs`` is unused: NeuS takes no NDC rays, its directions are the rays'),
        any direction length (NeuS works with unit directions, depth is along them):
        per-ray ``rgb``, ``depth``, ``acc`` (opacity), ``normal`` (weighted unit SDF gradients)."""
        return self._render(rays_o, rays_d)[0]

    def _render(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-ray outputs and the eikonal term over the samples within radius 1.2."""
        hp = self.hparams
        rays_d = F.normalize(rays_d, dim=-1)
        n = rays_o.shape[0]
        with phase("sample"):
            near, far = near_far_from_sphere(rays_o, rays_d)
            sample_dist = 2.0 / hp.n_samples
            u = torch.linspace(0.0, 1.0, hp.n_samples, device=rays_o.device)
            z = near[:, None] + (far - near)[:, None] * u
            train = self.training and hp.perturb > 0
            if train:  # one shift per ray, as NeuS
                z = z + (torch.rand(n, 1, device=z.device) - 0.5) * sample_dist
            z_out = None
            if hp.n_outside > 0:
                t = torch.linspace(1e-3, 1.0 - 1.0 / (hp.n_outside + 1.0), hp.n_outside, device=z.device).expand(n, -1)
                if train:
                    mids = 0.5 * (t[:, 1:] + t[:, :-1])
                    upper, lower = torch.cat([mids, t[:, -1:]], -1), torch.cat([t[:, :1], mids], -1)
                    t = lower + (upper - lower) * torch.rand_like(t)
                z_out = far[:, None] / torch.flip(t, [-1]) + 1.0 / hp.n_samples
        if hp.n_importance > 0 and hp.up_sample_steps > 0:
            with phase("sample.importance"):
                z = self._upsample(rays_o, rays_d, z)
        s = z.shape[1]
        bg_rgb = bg_alpha = None
        if z_out is not None:
            with phase("background"):
                z_feed = torch.sort(torch.cat([z, z_out], -1), -1).values
                bg_rgb, bg_alpha = self._background(rays_o, rays_d, z_feed, sample_dist)

        with phase("sample"):
            dists = torch.cat([z[:, 1:] - z[:, :-1], torch.full_like(z[:, :1], sample_dist)], -1)
            mid_z = z + dists * 0.5
            pts = (rays_o[:, None] + rays_d[:, None] * mid_z[..., None]).reshape(-1, 3)
            dirs = rays_d[:, None].expand(n, s, 3).reshape(-1, 3)
        with phase("sdf"):
            sdf, feature, grad = self.sdf_net.sdf_and_gradient(pts, create_graph=torch.is_grad_enabled())
        with phase("colour"):
            rgb = self.color_net(pts, grad, dirs, feature).reshape(n, s, 3)
        with phase("composite"):
            inv_s = self.variance.inv_s()
            alpha = neus_alpha(sdf, grad, dirs, dists.reshape(-1), inv_s, self.cos_anneal_ratio()).reshape(n, s)
            pts_norm = pts.norm(dim=-1).reshape(n, s)
            inside = (pts_norm < 1.0).to(alpha.dtype)
            if bg_alpha is not None:  # inside the sphere the SDF, outside it NeRF++ (both at NeuS's sample depths)
                alpha = torch.cat([alpha * inside + bg_alpha[:, :s] * (1 - inside), bg_alpha[:, s:]], -1)
                rgb = torch.cat([rgb * inside[..., None] + bg_rgb[:, :s] * (1 - inside[..., None]), bg_rgb[:, s:]], 1)
                z_w = torch.cat([mid_z, z_out], -1)  # depths of the merged samples (z_out lies beyond every z)
            else:
                z_w = mid_z
            weights = dense_weights(alpha, eps=1e-7)
            acc = weights.sum(-1)
            color = (rgb * weights[..., None]).sum(1)
            if bg_alpha is None and hp.background:
                color = color + hp.background * (1.0 - acc[:, None])
        with phase("eikonal"):
            relax = (pts_norm < 1.2).to(alpha.dtype)
            eikonal = (((grad.reshape(n, s, 3).norm(dim=-1) - 1.0) ** 2) * relax).sum() / (relax.sum() + 1e-5)
        with phase("composite"):
            w_in = weights[:, :s]
            normal = (F.normalize(grad, dim=-1).reshape(n, s, 3) * (w_in * inside)[..., None]).sum(1)
            depth = (weights * z_w).sum(-1)
        return {"rgb": color, "depth": depth, "acc": acc, "normal": normal}, eikonal

    # ---- training -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        views = self.scene_data.splits["train"]
        self.train_views = views
        if self.hparams.mask_weight > 0 and bool((views.mask > 0.5).all()):
            log.warning("every mask pixel is foreground (masks all white, as in data without masks): the mask loss "
                        "(mask_weight=%g) then pushes opacity to 1 everywhere. Use experiment=neus_womask or "
                        "model.mask_weight=0 for such data.", self.hparams.mask_weight)
        self._dev_views = (views.rgb.to(self.device), views.mask.to(self.device), views.c2w.to(self.device),
                           (views.K if views.K.dim() == 3 else views.K.expand(len(views), 3, 3)).to(self.device))

    def draw_rays(self, step: int) -> dict[str, torch.Tensor]:
        """NeuS's batch: ``batch_size`` random pixels of one image, images visited in shuffled epochs. A pure
        function of (seed, rank, step): a resumed run draws what an uninterrupted one would."""
        rgb, mask, c2w, K = self._dev_views
        n_img, h, w = rgb.shape[:3]
        epoch, k = divmod(step, n_img)
        g = torch.Generator().manual_seed(self.hparams.seed * 100_003 + self.global_rank * 7_919 + epoch)
        img = int(torch.randperm(n_img, generator=g)[k])
        g.manual_seed(self.hparams.seed * 100_003 + self.global_rank * 7_919 + 1_000_003 * (step + 1))
        px = torch.randint(w, (self.hparams.batch_size,), generator=g).to(self.device)
        py = torch.randint(h, (self.hparams.batch_size,), generator=g).to(self.device)
        rays_o, rays_d = rays_through(K[img], c2w[img], px + 0.5, py + 0.5)
        return {"rays_o": rays_o, "rays_d": rays_d, "rgb": rgb[img, py, px], "mask": mask[img, py, px]}

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        with phase("sample"):
            rays = self.draw_rays(self.global_step)
        out, eikonal = self._render(rays["rays_o"], rays["rays_d"])
        with phase("loss"):
            mask = (rays["mask"] > 0.5).float() if hp.mask_weight > 0 else torch.ones_like(rays["mask"])
            mask_sum = mask.sum() + 1e-5
            err = (out["rgb"] - rays["rgb"]) * mask[:, None]
            color_loss = err.abs().sum() / mask_sum
            psnr = 20.0 * torch.log10(1.0 / ((err**2).sum() / (mask_sum * 3.0)).sqrt())
            loss = color_loss + hp.igr_weight * eikonal
            if hp.mask_weight > 0:
                loss = loss + hp.mask_weight * F.binary_cross_entropy(out["acc"].clamp(1e-3, 1 - 1e-3), mask)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping "
                                         "before the optimizer step, so the last checkpoint is intact")
        with phase("log"):
            self.log_dict({"train/loss": loss.detach(), "train/psnr": psnr.detach(), "train/eikonal": eikonal.detach(),
                           "train/s_val": 1.0 / self.variance.inv_s().detach(), "train/cos_anneal": self.cos_anneal_ratio()},
                          prog_bar=True, batch_size=hp.batch_size)
        return loss

    # ---- geometry -----------------------------------------------------------------------------------
    def geometry_field(self):
        """What the mesh callback triangulates: the SDF (inside below ``mesh_threshold``) over the box
        [-1.01, 1.01]^3 of the normalised space (NeuS's object bounding box)."""
        return {"field": self.sdf_net.sdf, "level": self.hparams.mesh_threshold, "inside": "below",
                "bound_min": (-1.01,) * 3, "bound_max": (1.01,) * 3}
