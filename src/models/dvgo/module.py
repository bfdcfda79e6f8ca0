"""DVGO as a LightningModule: a coarse stage (explicit density + rgb grids) then a fine stage
(tightened box, mask cache, progressive scaling, feature grid + MLP), each with its own optimizer."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from src import kernels
from src.config import check_positive
from src.data.rays import RayBank, RaySampler
from src.kernels.grid_adam import GridAdam
from src.models.dvgo import stage_prep
from src.models.dvgo.field import DirectVoxGO
from src.models.dvgo.grid import MaskGrid
from src.models.rendering import RayMethod
from src.phases import phase

log = logging.getLogger(__name__)


@dataclass
class StageConfig:
    """One stage's published settings (DVGO ``coarse_train`` / ``fine_train`` + ``*_model_and_render``)."""

    iters: int
    num_voxels: int
    num_voxels_base: int
    alpha_init: float
    fast_color_thres: float
    rgbnet_dim: int
    maskout_near_cam_vox: bool
    world_bound_scale: float
    pervoxel_lr: bool
    pervoxel_lr_downrate: int
    ray_sampler: str  # random | in_maskcache
    weight_entropy_last: float
    weight_rgbper: float
    pg_scale: list[int]
    skip_zero_grad_fields: list[str]


class DVGOModule(RayMethod):
    """Args (all from ``conf/model/dvgo.yaml``):
        coarse, fine: :class:`StageConfig` fields.
        n_rand: rays per step. lr_density, lr_k0, lr_rgbnet: base learning rates; lrate_decay: lr x0.1
        every ``lrate_decay`` x 1000 steps. stepsize: sampling step in voxels. bbox_thres: alpha above
        which coarse voxels bound the fine box. mask_cache_thres: alpha above which coarse voxels are
        kept in the fine stage's mask cache. decay_after_scale: subtracted from the density shift at each
        progressive-scaling step. weight_distortion: distortion-loss weight. rgbnet_depth/width,
        viewbase_pe: the colour MLP. chunk: rays per forward when rendering images. seed: ray sampling.
        weight_tv_density, weight_tv_k0: total-variation weights, added straight into the grids' gradients
        (``kernels.total_variation_add_grad``) at stage-local steps in (tv_after, tv_before) every tv_every
        steps; on every voxel before tv_dense_before, else only on voxels rays touched (DVGO's switches).
        log_every: a one-line progress log (step, stage, train PSNR, stage seconds) every this many steps.
        stop_transmittance: early ray termination (DVGO's CUDA renderer stops compositing a ray once its
        transmittance falls below 1e-3; 0 composites every sample).
        render_path_frames: after testing, this many frames of the camera path (an orbit; DVGO's
            ``--render_video``) into ``render_path.mp4`` (rgb | depth) in the run dir (0: off).

    On a GPU a training step reads nothing back from the device except what a ragged batch needs (the
    number of samples, for allocating them): the stage is a Python int, the field's scalars are Python
    copies, rays are drawn on the device, and the finiteness of the loss is accumulated on the device and
    checked every ``log_every`` steps and before every checkpoint (on a CPU it is checked every step).
    """

    #: the scores the method is judged by (sweep summaries; the first is what a sweep optimises by default)
    key_metrics = ("test/psnr", "test/ssim", "test/lpips")
    meshes = True

    def __init__(self, coarse: dict, fine: dict, n_rand: int, lr_density: float, lr_k0: float, lr_rgbnet: float,
                 lrate_decay: float, stepsize: float, bbox_thres: float, mask_cache_thres: float,
                 decay_after_scale: float, weight_distortion: float, rgbnet_depth: int, rgbnet_width: int,
                 viewbase_pe: int, chunk: int, seed: int, log_every: int = 500, weight_tv_density: float = 0.0,
                 weight_tv_k0: float = 0.0, tv_every: int = 1, tv_after: int = 0, tv_before: int = 0,
                 tv_dense_before: int = 0, mesh_resolution: int = 0, mesh_threshold: float = 0.1,
                 stop_transmittance: float = 1e-3, render_path_frames: int = 0) -> None:
        super().__init__()
        check_positive("model", n_rand=n_rand, stepsize=stepsize, chunk=chunk, **{
            f"{name}.{key}": stage[key] for name, stage in (("coarse", coarse), ("fine", fine))
            for key in ("iters", "num_voxels", "num_voxels_base")})
        self.save_hyperparameters(logger=False)  # the loggers get the composed config once (pipeline.run)
        self.automatic_optimization = False
        self.coarse_cfg, self.fine_cfg = StageConfig(**coarse), StageConfig(**fine)
        mlp = dict(rgbnet_depth=rgbnet_depth, rgbnet_width=rgbnet_width, viewbase_pe=viewbase_pe,
                   stop_T=stop_transmittance)
        self.coarse = DirectVoxGO(self.coarse_cfg.num_voxels, self.coarse_cfg.num_voxels_base, self.coarse_cfg.alpha_init,
                                  self.coarse_cfg.fast_color_thres, 0, **mlp)
        self.fine = DirectVoxGO(self.fine_start_voxels, self.fine_cfg.num_voxels_base, self.fine_cfg.alpha_init,
                                self.fine_cfg.fast_color_thres, self.fine_cfg.rgbnet_dim, **mlp)
        self.register_buffer("stage", torch.tensor(0))  # 0: not started, 1: coarse, 2: fine (in checkpoints)
        self.stage_id = 0  # the same, read by every step without touching the device
        self.ray_bank: RayBank | None = None
        self.sampler: RaySampler | None = None
        self.stage_time = {"coarse": 0.0, "fine": 0.0}  # training seconds per stage (stage_times)
        self.pool_mask: torch.Tensor | None = None
        self._manual_grad_sync = False  # set under DDP (on_train_start)
        self._first_nonfinite: torch.Tensor | None = None  # CUDA: first step with a non-finite loss, or -1

    # ---- schedule ---------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.coarse_cfg.iters + self.fine_cfg.iters

    @property
    def fine_start_voxels(self) -> int:
        return int(self.fine_cfg.num_voxels / 2 ** len(self.fine_cfg.pg_scale))

    @property
    def field(self) -> DirectVoxGO:
        return self.fine if self.stage_id == 2 else self.coarse

    @property
    def stage_cfg(self) -> StageConfig:
        return self.fine_cfg if self.stage_id == 2 else self.coarse_cfg

    def on_train_start(self) -> None:
        model = self.trainer.model  # wrapped by now
        # DVGO replaces its grid parameters at stage starts and progressive-scaling steps, which DDP's
        # reducer (built once over the initial parameters) cannot follow: it is kept out of the backward
        # pass and the current field's gradients are averaged across ranks after each backward instead.
        self._manual_grad_sync = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def on_fit_start(self) -> None:
        dm = self.scene_data
        self.near, self.far, self.background = dm.near, dm.far, dm.background
        self.ray_bank = dm.train_rays.to(self.device)
        self.sampler = RaySampler(len(self.ray_bank), self.hparams.n_rand, self.hparams.seed,
                                  rank=self.global_rank, mode="random", device=self.device)
        if self.stage_id == 2 and self.fine_cfg.ray_sampler == "in_maskcache":  # resumed in the fine stage
            self._restrict_rays(self.coarse_cfg.iters)

    def _start_coarse(self) -> None:
        cfg, dm = self.coarse_cfg, self.scene_data
        xyz_min, xyz_max = stage_prep.bbox_from_frusta(self.ray_bank, self.near, self.far)
        self.coarse.reset_box(xyz_min, xyz_max, cfg.num_voxels)
        log.info("coarse box %s %s, grid %s", xyz_min.tolist(), xyz_max.tolist(), self.coarse.density.world_size)
        if cfg.maskout_near_cam_vox:
            stage_prep.maskout_near_cam_vox(self.coarse, dm.splits["train"].c2w[:, :3, 3].to(self.device), self.near)
        self._set_stage(1)
        self._set_optimizer(step_in_stage=0)
        if cfg.pervoxel_lr:
            log.info("counting the training views that see each voxel (%d views; DVGO's per-voxel learning rate)",
                     len(dm.splits["train"].c2w))
            count = stage_prep.voxel_count_views(self.coarse, dm.splits["train"], cfg.pervoxel_lr_downrate,
                                                 self.near, self.hparams.stepsize)
            self.optimizers().optimizer.param_groups[0]["per_lr"] = count / count.max()
            self.coarse.mask_cache.mask &= count[0, 0] > 2

    def _start_fine(self, step: int) -> None:
        cfg = self.fine_cfg
        xyz_min, xyz_max = stage_prep.bbox_from_coarse(self.coarse, self.hparams.bbox_thres, cfg.world_bound_scale)
        self.fine.reset_box(xyz_min, xyz_max, self.fine_start_voxels)
        self.fine.mask_cache.mask.copy_(stage_prep.mask_from_coarse(self.coarse, self.fine, self.hparams.mask_cache_thres))
        self.pool_mask = self.fine.mask_cache.mask.clone()  # saved: a resumed run rebuilds the same ray pool
        log.info("fine box %s %s, grid %s", xyz_min.tolist(), xyz_max.tolist(), self.fine.density.world_size)
        self._set_stage(2)
        self._set_optimizer(step_in_stage=0)
        if cfg.ray_sampler == "in_maskcache":
            self._restrict_rays(step)

    def _restrict_rays(self, step: int) -> None:
        """DVGO's ``in_maskcache`` sampler: from ``step`` on, only rays through the coarse geometry."""
        mask = MaskGrid(self.pool_mask.to(self.device), self.fine.xyz_min, self.fine.xyz_max)
        pool = stage_prep.rays_through_mask(mask, self.fine, self.ray_bank, self.near, self.hparams.stepsize)
        log.info("in_maskcache sampling: %d of %d training rays hit the coarse geometry", pool.numel(), len(self.ray_bank))
        self.sampler.restrict(pool, from_step=step, mode="permutation")

    def _set_stage(self, stage: int) -> None:
        if self.stage_id and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # stage_time counts the stage's queued GPU work, once per stage
        self.stage_id = stage
        self.stage.fill_(stage)

    def _local_step(self, step: int) -> int:
        """Steps since the current stage started (DVGO's per-stage step counter)."""
        return step - (self.coarse_cfg.iters if self.stage_id == 2 else 0)

    def _advance_schedule(self, step: int) -> None:
        """Stage switches, progressive scaling and occupancy-cache refreshes due at ``step``."""
        if self.stage_id == 0:
            self._start_coarse()
        if self.stage_id == 1 and step >= self.coarse_cfg.iters:
            self._start_fine(step)
        local = self._local_step(step)
        if (local + 500) % 1000 == 0:
            self.field.update_occupancy_cache()
        if self.stage_id == 2 and local in self.fine_cfg.pg_scale:
            n_rest = len(self.fine_cfg.pg_scale) - self.fine_cfg.pg_scale.index(local) - 1
            self.fine.scale_volume_grid(int(self.fine_cfg.num_voxels / 2**n_rest))
            self._set_optimizer(step_in_stage=0)
            self.fine.shift_density(-self.hparams.decay_after_scale)
            log.info("step %d: scaled the fine grid to %s", step, self.fine.density.world_size)

    # ---- optimisation -----------------------------------------------------------------------------
    def _param_groups(self, step_in_stage: int) -> list[dict]:
        hp, cfg, field = self.hparams, self.stage_cfg, self.field
        decay = 0.1 ** (step_in_stage / (hp.lrate_decay * 1000))
        groups = [
            {"params": [field.density.grid], "lr": hp.lr_density * decay, "skip_zero_grad": "density" in cfg.skip_zero_grad_fields},
            {"params": [field.k0.grid], "lr": hp.lr_k0 * decay, "skip_zero_grad": "k0" in cfg.skip_zero_grad_fields},
        ]
        if field.rgbnet is not None:
            groups.append({"params": list(field.rgbnet.parameters()), "lr": hp.lr_rgbnet * decay,
                           "skip_zero_grad": "rgbnet" in cfg.skip_zero_grad_fields})
        return groups

    def configure_optimizers(self):
        return GridAdam(self._param_groups(step_in_stage=0))

    def _set_optimizer(self, step_in_stage: int) -> None:
        """Fresh optimizer on the current stage's (possibly resized) grids, as DVGO does at every stage
        start and progressive-scaling step (the learning-rate decay restarts)."""
        self.trainer.strategy.optimizers = [GridAdam(self._param_groups(step_in_stage))]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Here, not in training_step: Lightning attaches its step counter to the optimizer after this hook.
        self._advance_schedule(self.global_step)

    def training_step(self, batch, batch_idx):
        step = self.global_step
        cfg, hp, tic = self.stage_cfg, self.hparams, time.perf_counter()
        with phase("sample"):
            rays = self.ray_bank[self.sampler.indices(step)]
        out = self.field(rays.rays_o, rays.rays_d, self.near, hp.stepsize, self.background, rays.viewdirs)

        with phase("loss"):
            mse = F.mse_loss(out["rgb"], rays.rgb)
            loss = mse
            if cfg.weight_entropy_last > 0:  # push each ray to end fully opaque or fully empty
                p = out["T_last"].clamp(1e-6, 1 - 1e-6)
                loss = loss + cfg.weight_entropy_last * -(p * p.log() + (1 - p) * (1 - p).log()).mean()
            if cfg.weight_rgbper > 0:  # every contributing sample should itself have the pixel's colour
                per_point = (out["raw_rgb"] - rays.rgb[out["ray_id"]]).pow(2).sum(-1)
                loss = loss + cfg.weight_rgbper * (per_point * out["weights"].detach()).sum() / len(rays)
            if hp.weight_distortion > 0:  # s: normalised step position; n_max stays on the device (a 0-d tensor)
                n_max = out["n_steps"].max().clamp(min=1).to(out["weights"].dtype)
                s = (out["step_id"].to(n_max.dtype) + 0.5) / n_max
                loss = loss + hp.weight_distortion * kernels.distortion_loss(out["weights"], s, 1 / n_max, out["ray_id"], len(rays))
            self._check_finite(loss, step)

        opt = self.optimizers()
        with phase("optimizer"):
            opt.zero_grad(set_to_none=True)
        sync = self._manual_grad_sync
        if sync:  # Lightning re-arms DDP's reducer before every step: disarm it for this backward
            self.trainer.model.require_backward_grad_sync = False
        with phase("backward"):
            self.manual_backward(loss)
            if sync:
                self._average_gradients()
        with phase("optimizer"):
            self._total_variation(self._local_step(step), len(rays))
            opt.step()
            decay = 0.1 ** (1 / (hp.lrate_decay * 1000))
            for group in opt.optimizer.param_groups:
                group["lr"] *= decay
        self.stage_time[self.stage_name] += time.perf_counter() - tic
        psnr = -10 * torch.log10(mse.detach())
        if hp.log_every and (step + 1) % hp.log_every == 0:
            log.info("step %d (%s): train psnr %.2f, %.0f s in this stage", step + 1, self.stage_name, float(psnr),
                     self.stage_time[self.stage_name])
        if hp.log_every and (step + 1) % hp.log_every == 0:
            self._raise_if_nonfinite()
        with phase("log"):
            self.log_dict({"train/loss": loss.detach(), "train/psnr": psnr, "train/stage": float(self.stage_id)},
                          prog_bar=True, batch_size=len(rays))
        return loss.detach()

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Stop on a non-finite loss. CPU: at once, before the optimizer step. CUDA: record the first such
        step on the device (reading it every step would stall the GPU) for :meth:`_raise_if_nonfinite`."""
        if not loss.is_cuda:
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss ({loss.item()}) at step {step} ({self.stage_name} stage); "
                    "stopping before the optimizer step, so the last checkpoint is intact")
            return
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, torch.full_like(self._first_nonfinite, step), self._first_nonfinite)

    def _raise_if_nonfinite(self) -> None:
        if self._first_nonfinite is not None and int(self._first_nonfinite) >= 0:
            raise FloatingPointError(
                f"non-finite training loss at step {int(self._first_nonfinite)} (found at step {self.global_step}); "
                "stopping before the next checkpoint, so the checkpoints on disk predate it")

    def on_train_end(self) -> None:
        self._raise_if_nonfinite()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._manual_grad_sync:  # DDP: every rank must end with the same field
            import torch.distributed as dist

            with torch.no_grad():
                mine = torch.stack([p.double().sum() for p in self.field.parameters()])
            theirs = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(theirs, mine)
            if not all(torch.allclose(t, theirs[0], rtol=1e-6, atol=1e-6) for t in theirs):
                raise RuntimeError("DDP ranks ended training with different DVGO parameters (gradient averaging failed)")
            log.info("DDP: parameters identical across %d ranks", len(theirs))

    def _average_gradients(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size()
        for p in self.field.parameters():
            if p.grad is None:  # every rank has the same parameters, so the same None pattern
                continue
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world

    def _total_variation(self, local_step: int, n_rays: int) -> None:
        hp = self.hparams
        if not (hp.tv_after < local_step < hp.tv_before and local_step % hp.tv_every == 0):
            return
        dense = local_step < hp.tv_dense_before
        for grid, weight in ((self.field.density, hp.weight_tv_density), (self.field.k0, hp.weight_tv_k0)):
            if weight > 0 and grid.grid.grad is not None:  # DVGO scales the weight with the grid resolution
                w = weight / n_rays * max(grid.world_size) / 128
                kernels.total_variation_add_grad(grid.grid, grid.grid.grad, w, w, w, dense)

    @property
    def stage_name(self) -> str:
        return "fine" if self.stage_id == 2 else "coarse"

    def stage_times(self) -> dict[str, float]:
        return dict(self.stage_time)

    # ---- rendering and checkpoints ----------------------------------------------------------------
    def render_rays(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
                    viewdirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        near, _, background = self._scene()
        out = self.field(rays_o, rays_d, near, self.hparams.stepsize, background, viewdirs)
        return {"rgb": out["rgb"], "depth": out["depth"], "acc": out["acc"]}

    def geometry_field(self):
        """What the mesh callback triangulates: the opacity of a rendering sample (alpha over ``stepsize``
        voxels) of the current stage's grid, inside above ``mesh_threshold``, over the grid's box."""
        field, interval = self.field, self.hparams.stepsize * self.field.voxel_size_ratio

        def alpha(pts: torch.Tensor) -> torch.Tensor:
            return kernels.raw2alpha(field.density(pts)[:, 0], field.act_shift_value, interval)

        return {"field": alpha, "level": self.hparams.mesh_threshold, "inside": "above",
                "bound_min": field.xyz_min.tolist(), "bound_max": field.xyz_max.tolist()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        self.stage_id = int(state["stage"])
        self.coarse.match_state(state, "coarse.")
        self.fine.match_state(state, "fine.")
        self.stage_time.update(checkpoint["dvgo_stage_time"])
        self.pool_mask = checkpoint["dvgo_pool_mask"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_nonfinite()  # never write a checkpoint of a diverged field
        checkpoint["dvgo_stage_time"] = dict(self.stage_time)
        checkpoint["dvgo_pool_mask"] = None if self.pool_mask is None else self.pool_mask.cpu()
