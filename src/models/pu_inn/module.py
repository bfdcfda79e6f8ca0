"""PU-INN as a LightningModule: trains on (256 -> 1024) patches with Chamfer, PU-GAN's uniform term, optional
EMD and repulsion, and a negative log-likelihood term; ``validation_step`` estimates the flow's
log-determinant (its own estimator, with gradients, as seed 001's did), logs it per point beside the exact
value, and scores val patches; ``test_step`` upsamples whole test shapes (2048 -> r x 2048) by patches and
scores them against the mesh (CD, HD, EMD, P2F)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from src.config import check_positive
from src.geometry.knn import chamfer, knn_points
from src.geometry.pu_metrics import (cd_hd, emd_exact, even_surface_sample, farthest_point_sample,
                                     normalize_unit_sphere, point_triangle_distance)
from src.models.base import finish_test
from src.models.pu_inn.losses import repulsion_loss, uniform_loss
from src.models.pu_inn.network import PUINN
from src.phases import PhaseHooks, phase

log = logging.getLogger(__name__)


def remove_outliers(points: torch.Tensor, k: int = 8, std_ratio: float = 3.0) -> torch.Tensor:
    """Statistical outlier removal: drop the points whose mean distance to their ``k`` nearest neighbours is more
    than ``std_ratio`` standard deviations above the mean of that distance."""
    d = knn_points(points[None], points[None], k + 1)[0][0, :, 1:].sqrt().mean(-1)
    return points[d <= d.mean() + std_ratio * d.std()]


def upsample_shape(model: PUINN, points: torch.Tensor, patch_size: int = 256, patch_ratio: float = 3.0,
                   merge_input: bool = False, outlier_std: float | None = None) -> torch.Tensor:
    """PU-GAN's test-time patching: ``patch_ratio * N / patch_size`` farthest-point seeds, the ``patch_size``
    nearest points of each seed as a patch normalised to the unit sphere, each patch upsampled, mapped back,
    all merged and thinned by farthest-point sampling to r x N points. PU-Flow's variant: ``patch_ratio`` 4 and
    the input patches merged into the result before thinning (``merge_input``); ``outlier_std``: statistical
    outlier removal of the merged cloud before thinning (None: off, as PU-GAN)."""
    n = points.shape[0]
    n_patches = max(1, int(round(patch_ratio * n / patch_size)))
    seeds = farthest_point_sample(points, min(n_patches, n))
    near = torch.cdist(points[seeds], points).topk(min(patch_size, n), largest=False).indices
    outs = []
    for patch in points[near]:  # (patch_size, 3)
        normed, centre, scale = normalize_unit_sphere(patch)
        up = model(normed[None])["dense"][0]
        outs.append(up * scale + centre)
        if merge_input:
            outs.append(patch)
    merged = torch.cat(outs)
    if outlier_std is not None:
        merged = remove_outliers(merged, std_ratio=outlier_std)
    return merged[farthest_point_sample(merged, min(model.up_ratio * n, merged.shape[0]))]


def ground_truth(verts, faces, n: int, oversample: int = 8) -> torch.Tensor:
    """The benchmark's ground truth of a mesh: an even ``n``-point sample (float64, seed 0)."""
    verts, faces = torch.as_tensor(verts).double(), torch.as_tensor(faces)
    return even_surface_sample(verts.numpy(), faces.numpy(), n, oversample).double()


def score_shape(pred: torch.Tensor, verts, faces, gt_points: int | None = None, gt_oversample: int = 8,
                gt: torch.Tensor | None = None) -> dict[str, float]:
    """A cloud (N, 3) against its mesh, as the PU-GAN benchmark scores it (raw values): CD (with its halves) and
    HD against ``ground_truth`` of ``gt_points`` points (default N), EMD (when the sizes agree) and P2F (mean,
    std), all in the ground truth's unit-sphere frame. ``gt``: that ground truth made once by the caller, for
    many clouds of one mesh (the even sample takes seconds)."""
    pred = pred.detach().double()
    gt = (ground_truth(verts, faces, gt_points or pred.shape[0], gt_oversample) if gt is None else gt).to(pred)
    verts, faces = torch.as_tensor(verts).double().to(pred.device), torch.as_tensor(faces).to(pred.device)
    scores = cd_hd(pred, gt)
    if pred.shape[0] == gt.shape[0]:
        scores["emd"] = float(emd_exact(normalize_unit_sphere(pred)[0][None], normalize_unit_sphere(gt)[0][None])[0])
    _, centre, scale = normalize_unit_sphere(gt)  # the benchmark normalises both clouds
    p2f = point_triangle_distance((pred - centre) / scale, (verts - centre) / scale, faces)
    scores.update({"p2f": float(p2f.mean()), "p2f_std": float(p2f.std())})
    return scores


class PUINNModule(PhaseHooks, L.LightningModule):
    """Args (``conf/model/pu_inn.yaml``): net: ``PUINN`` options. lr, weight_decay, lr_decay_every,
    lr_decay: Adam with step decay. w_cd, w_uniform, w_emd, w_repulsion, w_nll: loss weights (sources in the
    config). iters: training steps. logdet_exact_every: every how many validations the exact log-det is
    computed beside the estimate (0: never). patch_size, patch_ratio, merge_input, outlier_std: the test
    protocol (``upsample_shape``; PU-GAN's by default). gt_points: size of the even ground-truth sample of each
    test mesh (default r x the input: 8192 for 2048 inputs); gt_oversample: area samples per ground-truth point
    before farthest-point thinning."""

    #: the scores the method is judged by (sweep summaries; the first is what a sweep optimises by default)
    key_metrics = ("test/cd", "test/hd", "test/p2f")

    def __init__(self, net: dict | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_decay_every: int = 20000, lr_decay: float = 0.5, w_cd: float = 100.0, w_uniform: float = 10.0,
                 w_emd: float = 0.0, w_repulsion: float = 0.0, w_nll: float = 0.01, iters: int = 100000,
                 logdet_exact_every: int = 1, patch_size: int = 256, patch_ratio: float = 3.0,
                 merge_input: bool = False, outlier_std: float | None = None, gt_points: int | None = None,
                 gt_oversample: int = 8) -> None:
        super().__init__()
        check_positive("model", iters=iters, patch_size=patch_size, patch_ratio=patch_ratio)
        if outlier_std is not None and not outlier_std > 0:
            raise ValueError(f"model.outlier_std must be > 0 or null, got {outlier_std!r}")
        self.save_hyperparameters(logger=False)  # the loggers get the composed config once (pipeline.run)
        self.net = PUINN(**(net or {}))

    @property
    def total_steps(self) -> int:
        return self.hparams.iters

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, self.hparams.lr_decay_every, self.hparams.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _losses(self, batch: dict, logdet_parts: bool = False) -> dict[str, torch.Tensor]:
        """The weighted terms and their sum; ``logdet_parts``: also the NLL's per-point log-dets and contexts
        (``_parts``), for validation's log-det report."""
        hp = self.hparams
        out = self.net(batch["sparse"])
        with phase("loss"):
            losses = {"cd": chamfer(out["dense"], batch["dense"]).mean()}
            if hp.w_uniform > 0:
                losses["uniform"] = uniform_loss(out["dense"])
            if hp.w_repulsion > 0:
                losses["repulsion"] = repulsion_loss(out["dense"])
            if hp.w_emd > 0:
                losses["emd"] = emd_exact(out["dense"], batch["dense"]).mean()
        if hp.w_nll > 0 or logdet_parts:
            nll, logdet, ctx = self.net.nll(batch["sparse"], out["features"], batch["dense"], with_parts=True)
            losses["nll"] = nll
            if logdet_parts:
                losses["_parts"] = (logdet, ctx)
        weights = {"cd": hp.w_cd, "uniform": hp.w_uniform, "repulsion": hp.w_repulsion, "emd": hp.w_emd, "nll": hp.w_nll}
        losses["loss"] = sum(weights[k] * v for k, v in losses.items() if k in weights and weights[k] > 0)
        return losses

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite training loss ({losses['loss'].item()}) at step {self.global_step}; "
                                     "stopping before the optimizer step, so the last checkpoint is intact")
        with phase("log"):
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True,
                          batch_size=batch["sparse"].shape[0])
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self.net.refresh(50)  # power-iteration norms (exact_norm=False) converge before the log-dets
        self._n_validations = getattr(self, "_n_validations", 0) + 1

    @property
    def eval_estimator(self) -> str:
        return self.net.blocks[0].eval_estimator

    def fit_facts(self) -> dict:
        """Into metrics.json beside the val scores: the estimator ``val/logdet`` and ``val/nll`` came from."""
        return {"val/logdet_estimator": self.eval_estimator}

    def validation_step(self, batch, batch_idx) -> None:
        """Scores val patches (``val/cd``, beside ``val/cd_input``: the sparse input alone against the same
        target); the NLL uses the evaluation log-det estimator, which needs gradients (the flow turns inference
        mode off locally). Logs ``val/logdet`` (the flow's log-det per target point, by the
        evaluation estimator, whose name is in ``val/logdet_estimator``) and, every ``logdet_exact_every``
        validations, the exact value at the same points (``val/logdet_exact``), the estimate's mean error
        (``val/logdet_bias``) and the spread of its per-point error (``val/logdet_error_std``)."""
        losses = self._losses(batch, logdet_parts=True)
        logdet, ctx = losses.pop("_parts")
        n = batch["sparse"].shape[0]
        with phase("log"):
            self.log_dict({f"val/{k}": v.detach() for k, v in losses.items()}, batch_size=n, sync_dist=True)
            self.log("val/logdet", logdet.detach().mean(), batch_size=n, sync_dist=True)
            # the input alone scored the same way: what val/cd must beat for the network to add anything
            self.log("val/cd_input", chamfer(batch["sparse"], batch["dense"]).mean(), batch_size=n, sync_dist=True)
        every = self.hparams.logdet_exact_every
        if every and self._n_validations % every == 0:
            if self.eval_estimator == "exact":
                exact = logdet
            else:
                with phase("logdet"):
                    _, exact = self.net.flow(batch["dense"].reshape(-1, 3), ctx, estimator="exact")
            err = (logdet - exact).detach()
            with phase("log"):
                self.log_dict({"val/logdet_exact": exact.detach().mean(), "val/logdet_bias": err.mean(),
                               "val/logdet_error_std": err.std() if err.numel() > 1 else err.abs().mean()},
                              batch_size=n, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            log.info("val/logdet by the '%s' estimator: %.4f nats per point%s", self.eval_estimator,
                     float(self.trainer.callback_metrics.get("val/logdet", float("nan"))),
                     "" if "val/logdet_exact" not in self.trainer.callback_metrics else
                     f" (exact {float(self.trainer.callback_metrics['val/logdet_exact']):.4f})")

    def test_step(self, batch, batch_idx) -> None:
        shape = batch
        hp = self.hparams
        pred = upsample_shape(self.net, shape["input"].to(self.device), hp.patch_size, hp.patch_ratio,
                              hp.merge_input, hp.outlier_std)
        scores = score_shape(pred, shape["verts"], shape["faces"], self.hparams.gt_points, self.hparams.gt_oversample)
        folder = Path(self.trainer.default_root_dir) / "test_points"
        folder.mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / f"{shape['name']}.xyz", pred.cpu().numpy(), fmt="%.6f")
        self._test_rows[shape["name"]] = {"name": shape["name"], "n_input": int(shape["input"].shape[0]),
                                          "n_output": int(pred.shape[0]),
                                          **{f"test/{k}": v * 1e3 for k, v in scores.items()},
                                          "files": [f"test_points/{shape['name']}.xyz"]}
        log.info("%s: %s (x1e-3)", shape["name"], " ".join(f"{k.upper()} {v * 1e3:.3f}" for k, v in scores.items()))

    def on_test_epoch_start(self) -> None:
        self._test_rows: dict[str, dict] = {}

    def on_test_epoch_end(self) -> None:
        """Means over the unique shapes; per-shape scores (x1e-3, as the PU-GAN tables print them) ->
        ``test_scores.json`` in the run dir."""
        finish_test(self, self._test_rows)
