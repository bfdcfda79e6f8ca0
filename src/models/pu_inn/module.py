"""PU-INN as a LightningModule: trains on (256 -> 1024) patches with Chamfer, PU-GAN's uniform term, optional
EMD and repulsion, and PU-Flow's negative log-likelihood of the input points; ``validation_step`` estimates the
flow's log-determinant (its own estimator, with gradients, as PU-INN's ``validation_step`` does), logs it per
point beside the exact value, and scores val patches; ``test_step`` upsamples whole test shapes (2048 -> r x 2048)
by patches, in one or more patch layouts, and scores them against the mesh (CD, HD, EMD, P2F)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from src.config import check_positive
from src.geometry.knn import chamfer, knn_points
from src.geometry.pu_metrics import cd_hd, emd_exact, normalize_unit_sphere, point_triangle_distance
from src.geometry.sampling import even_surface_sample, farthest_point_sample
from src.models.method import Method, finish_test
from src.models.pu_inn.losses import repulsion_loss, surface_loss, uniform_loss
from src.models.pu_inn.network import PUINN
from src.phases import PhaseHooks, phase

log = logging.getLogger(__name__)


def nll(latent: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats per point of points whose latent codes (..., 3) and flow log-dets (...) are
    given, under a standard normal prior on the latent."""
    log_prior = -0.5 * (latent**2).sum(-1) - 1.5 * math.log(2 * math.pi)
    return -(log_prior + logdet).mean()


def remove_outliers(points: torch.Tensor, k: int = 8, std_ratio: float = 3.0) -> torch.Tensor:
    """Statistical outlier removal: drop the points whose mean distance to their ``k`` nearest neighbours is more
    than ``std_ratio`` standard deviations above the mean of that distance."""
    d = knn_points(points[None], points[None], k + 1)[0][0, :, 1:].sqrt().mean(-1)
    return points[d <= d.mean() + std_ratio * d.std()]


def upsample_shape(model: PUINN, points: torch.Tensor, patch_size: int = 256, patch_ratio: float = 3.0,
                   merge_input: bool = False, outlier_std: float | None = None, n_outliers: int = 0,
                   patch_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """PU-GAN's test-time patching: ``patch_ratio * N / patch_size`` farthest-point seeds, the ``patch_size``
    nearest points of each seed as a patch normalised to the unit sphere, each patch upsampled, mapped back,
    all merged and thinned by farthest-point sampling to r x N points. PU-Flow's variant (its ``evaluate_pflow.py``):
    ``patch_ratio`` 4, the input patches merged into the result before thinning (``merge_input``), thinning to
    r x N + ``n_outliers`` points and then dropping the ``n_outliers`` of them farthest from the input (32 in
    PU-Flow's release). ``outlier_std``: statistical outlier removal of the merged cloud before thinning (None:
    off, as PU-GAN and PU-Flow). ``patch_fn(normed, centre, scale)``: upsamples one patch (P, 3), normalised to its
    unit sphere by ``centre`` and ``scale``, to (r P, 3) in the same frame (default: ``model``'s dense output)."""
    n = points.shape[0]
    n_patches = max(1, int(round(patch_ratio * n / patch_size)))
    seeds = farthest_point_sample(points, min(n_patches, n))
    near = torch.cdist(points[seeds], points).topk(min(patch_size, n), largest=False).indices
    outs = []
    for patch in points[near]:  # (patch_size, 3)
        normed, centre, scale = normalize_unit_sphere(patch)
        up = model(normed[None])["dense"][0] if patch_fn is None else patch_fn(normed, centre, scale)
        outs.append(up * scale + centre)
        if merge_input:
            outs.append(patch)
    merged = torch.cat(outs)
    if outlier_std is not None:
        merged = remove_outliers(merged, std_ratio=outlier_std)
    m = min(model.up_ratio * n, merged.shape[0])
    kept = merged[farthest_point_sample(merged, min(m + max(0, n_outliers), merged.shape[0]))]
    if kept.shape[0] > m:  # PU-Flow's outlier removal: the points farthest from the input go
        far = knn_points(kept[None], points[None].to(kept), 1)[0][0, :, 0]
        kept = kept[far.argsort()[:m].sort().values]
    return kept


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


def layout_orders(n: int, layouts: int) -> list[torch.Tensor]:
    """The orders a test input of ``n`` points is upsampled in: its own, then seeded random permutations (seeds 1,
    2, ...). The patch seeds are farthest-point sampled from the first point, so each order is another layout of
    the patches (another draw of the test protocol)."""
    return [torch.arange(n)] + [torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(1, layouts)]


def upsample_layouts(model: PUINN, shape: dict, layouts: int, gt: torch.Tensor, **protocol) -> tuple[list, dict]:
    """A test shape upsampled (``upsample_shape`` with ``protocol``) in ``layouts`` patch layouts
    (``layout_orders``) and scored against ``gt``: the clouds, and CD (with its halves) and HD averaged over the
    layouts, with, for more than one, their spread (``cd_std``, ``hd_std``); EMD and P2F (``score_shape``; seconds
    per cloud) are the first layout's. One layout's CD moves by several percent with where the patches fall, so
    comparisons of models need the mean of a few."""
    device = next(model.parameters()).device
    clouds, rows = [], []
    for i, order in enumerate(layout_orders(shape["input"].shape[0], layouts)):
        clouds.append(upsample_shape(model, shape["input"][order].to(device), **protocol))
        rows.append(score_shape(clouds[-1], shape["verts"], shape["faces"], gt=gt) if i == 0 else
                    cd_hd(clouds[-1].detach().double(), gt.to(clouds[-1].device)))
    scores = {**rows[0], **{k: sum(r[k] for r in rows) / len(rows) for k in rows[-1]}}
    if len(rows) > 1:
        scores.update({f"{k}_std": float(torch.tensor([r[k] for r in rows]).std()) for k in ("cd", "hd")})
    return clouds, scores


class PUINNModule(PhaseHooks, Method):
    """Args (``conf/model/pu_inn.yaml``): net: ``PUINN`` options. lr, weight_decay, lr_decay_every,
    lr_decay: Adam with step decay. w_cd, w_uniform, w_emd, w_repulsion, w_nll, w_surface: loss weights (sources in the
    config). iters: training steps. logdet_exact_every: every how many validations the exact log-det is
    computed beside the estimate (0: never). patch_size, patch_ratio, merge_input, outlier_std, n_outliers: the
    test protocol (``upsample_shape``; PU-GAN's by default); test_layouts: patch layouts each test shape is
    upsampled and scored in, the scores averaged (``upsample_layouts``). gt_points: size of the even ground-truth sample of each
    test mesh (default r x the input: 8192 for 2048 inputs); gt_oversample: area samples per ground-truth point
    before farthest-point thinning."""

    #: the scores the method is judged by (sweep summaries; the first is what a sweep optimises by default)
    key_metrics = ("test/cd", "test/hd", "test/p2f")

    def __init__(self, net: dict | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 lr_decay_every: int = 20000, lr_decay: float = 0.5, w_cd: float = 100.0, w_uniform: float = 10.0,
                 w_emd: float = 0.0, w_repulsion: float = 0.0, w_nll: float = 0.01, w_surface: float = 0.0,
                 iters: int = 100000,
                 logdet_exact_every: int = 1, patch_size: int = 256, patch_ratio: float = 3.0,
                 merge_input: bool = False, outlier_std: float | None = None, n_outliers: int = 0,
                 test_layouts: int = 1, gt_points: int | None = None, gt_oversample: int = 8) -> None:
        super().__init__()
        check_positive("model", iters=iters, patch_size=patch_size, patch_ratio=patch_ratio, test_layouts=test_layouts)
        if outlier_std is not None and not outlier_std > 0:
            raise ValueError(f"model.outlier_std must be > 0 or null, got {outlier_std!r}")
        if n_outliers < 0:
            raise ValueError(f"model.n_outliers must be >= 0, got {n_outliers!r}")
        self.save_hyperparameters(logger=False)  # the loggers get the composed config once (pipeline.run)
        self.net = PUINN(**(net or {}))

    @property
    def test_protocol(self) -> dict:
        """The ``upsample_shape`` options of this model's test protocol."""
        hp = self.hparams
        return dict(patch_size=hp.patch_size, patch_ratio=hp.patch_ratio, merge_input=hp.merge_input,
                    outlier_std=hp.outlier_std, n_outliers=hp.n_outliers)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, self.hparams.lr_decay_every, self.hparams.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _losses(self, batch: dict, with_logdet: bool = False) -> dict[str, torch.Tensor]:
        """The weighted terms and their sum. The NLL is PU-Flow's: the negative log-likelihood (nats per point,
        standard normal prior on the latent) of the sparse input points under the flow, from the same forward pass
        that gives their latent codes (its log-det by the block's training or evaluation estimator; ``with_logdet``:
        also when the NLL is not weighted). Also ``_out``, the network's outputs."""
        hp = self.hparams
        out = self.net(batch["sparse"], with_logdet=hp.w_nll > 0 or with_logdet)
        with phase("loss"):
            losses = {"cd": chamfer(out["dense"], batch["dense"]).mean()}
            if hp.w_uniform > 0:
                losses["uniform"] = uniform_loss(out["dense"])
            if hp.w_repulsion > 0:
                losses["repulsion"] = repulsion_loss(out["dense"])
            if hp.w_emd > 0:
                losses["emd"] = emd_exact(out["dense"], batch["dense"]).mean()
            if hp.w_surface > 0:  # every candidate, kept by the farthest-point selection or not
                losses["surface"] = surface_loss(out.get("candidates", out["dense"]), batch["dense"],
                                                 batch.get("normals"))
            if out["logdet"] is not None:
                with phase("nll"):
                    losses["nll"] = nll(out["latent"], out["logdet"])
        weights = {"cd": hp.w_cd, "uniform": hp.w_uniform, "repulsion": hp.w_repulsion, "emd": hp.w_emd, "nll": hp.w_nll,
                   "surface": hp.w_surface}
        losses["loss"] = sum(weights[k] * v for k, v in losses.items() if k in weights and weights[k] > 0)
        losses["_out"] = out
        return losses

    def training_step(self, batch, batch_idx):
        losses = self._losses(batch)
        losses.pop("_out")
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
        target); the NLL's log-det by the evaluation estimator, which needs gradients (the flow turns inference
        mode off locally). Logs ``val/logdet`` (the flow's log-det per input point, by the evaluation estimator,
        whose name is in ``val/logdet_estimator``), ``val/flow_offset`` (each batch's median distance of the decoded
        points from the convex mix of their neighbours, in units of the parent's spacing to its nearest input,
        averaged over the batches: what the flow itself moves the new points) and, every ``logdet_exact_every`` validations, the exact log-det at the
        same points (``val/logdet_exact``), the estimate's mean error (``val/logdet_bias``) and the spread of its
        per-point error (``val/logdet_error_std``)."""
        losses = self._losses(batch, with_logdet=True)
        out = losses.pop("_out")
        logdet = out["logdet"].reshape(-1)
        n = batch["sparse"].shape[0]
        with phase("log"):
            self.log_eval({**{f"val/{k}": v.detach() for k, v in losses.items()},
                           "val/logdet": logdet.detach().mean(), "val/flow_offset": out["flow_offset"].median(),
                           # the input alone scored the same way: what val/cd must beat for the network to add anything
                           "val/cd_input": chamfer(batch["sparse"], batch["dense"]).mean()}, batch_size=n)
        every = self.hparams.logdet_exact_every
        if every and self._n_validations % every == 0:
            if self.eval_estimator == "exact":
                exact = logdet
            else:
                with phase("logdet"):
                    ctx = out["features"].reshape(logdet.shape[0], -1)
                    _, exact = self.net.flow(batch["sparse"].reshape(-1, 3), ctx, estimator="exact")
            err = (logdet - exact).detach()
            with phase("log"):
                self.log_eval({"val/logdet_exact": exact.detach().mean(), "val/logdet_bias": err.mean(),
                               "val/logdet_error_std": err.std() if err.numel() > 1 else err.abs().mean()},
                              batch_size=n)

    def on_validation_epoch_end(self) -> None:
        means = self.log_eval_means()
        if not self.trainer.sanity_checking:
            log.info("val/logdet by the '%s' estimator: %.4f nats per point%s", self.eval_estimator,
                     means.get("val/logdet", float("nan")),
                     "" if "val/logdet_exact" not in means else f" (exact {means['val/logdet_exact']:.4f})")

    def test_step(self, batch, batch_idx) -> None:
        shape, hp = batch, self.hparams
        gt = ground_truth(shape["verts"], shape["faces"], hp.gt_points or self.net.up_ratio * shape["input"].shape[0],
                          hp.gt_oversample)
        clouds, scores = upsample_layouts(self.net, shape, hp.test_layouts, gt, **self.test_protocol)
        folder = Path(self.trainer.default_root_dir) / "test_points"
        folder.mkdir(parents=True, exist_ok=True)
        np.savetxt(folder / f"{shape['name']}.xyz", clouds[0].cpu().numpy(), fmt="%.6f")
        self._test_rows[shape["name"]] = {"name": shape["name"], "n_input": int(shape["input"].shape[0]),
                                          "n_output": int(clouds[0].shape[0]), "layouts": len(clouds),
                                          **{f"test/{k}": v * 1e3 for k, v in scores.items()},
                                          "files": [f"test_points/{shape['name']}.xyz"]}
        log.info("%s: %s (x1e-3)", shape["name"], " ".join(f"{k.upper()} {v * 1e3:.3f}" for k, v in scores.items()))

    def on_test_epoch_start(self) -> None:
        self._test_rows: dict[str, dict] = {}

    def on_test_epoch_end(self) -> None:
        """Means over the unique shapes; per-shape scores (x1e-3, as the PU-GAN tables print them) ->
        ``test_scores.json`` in the run dir."""
        finish_test(self, self._test_rows)
