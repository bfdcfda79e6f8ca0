"""Proto-Depth as a LightningModule: a depth map's points explained by K slots, each a blend of P learnable
mesh prototypes placed by a per-slot scale, rotation and translation; trained with the hybrid Chamfer loss
plus mesh regularisers on the prototypes. Losses are computed in each map's normalised frame (points
centred on their mean, divided by their furthest distance); ``val/chamfer`` and ``test/chamfer`` in the
camera frame (metres squared)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.config import check_positive
from src.geometry.camera import intrinsics_matrix, project_points
from src.geometry.knn import chamfer
from src.geometry.sampling import sample_points
from src.models.method import Method, finish_test
from src.models.rendering import depth_to_gray
from src.models.proto_depth.losses import hybrid_chamfer, slot_coverage
from src.models.proto_depth.network import ProtoDepthNet, slot_colours
from src.phases import PhaseHooks, phase


class ProtoDepthModule(PhaseHooks, Method):
    """Args (``conf/model/proto_depth.yaml``): net: ``ProtoDepthNet`` options (num_slots, num_prototypes,
    ico_level, ...). samples_per_slot: points sampled on each slot's mesh per step. k_nearest: neighbours of
    the target-to-prediction term. w_target, w_slot, w_repulse, repulse_margin: the hybrid Chamfer loss.
    w_edge, w_normal, w_laplacian: prototype regularisers. lr, iters: Adam and the number of steps.
    looped_transform: use the looped reference transform (slow; for checks). dense_chamfer: all-pairs
    instead of KNN (the reference). eval_samples_per_slot: points per slot when scoring."""

    #: the scores the method is judged by (sweep summaries; the first is what a sweep optimises by default)
    key_metrics = ("test/chamfer", "test/slots_used")

    def __init__(self, net: dict | None = None, samples_per_slot: int = 200, k_nearest: int = 3, w_target: float = 1.0,
                 w_slot: float = 1.0, w_repulse: float = 0.1, repulse_margin: float = 0.2, w_edge: float = 1.0,
                 w_normal: float = 0.01, w_laplacian: float = 0.1, lr: float = 1e-3, iters: int = 20000,
                 looped_transform: bool = False, dense_chamfer: bool = False, eval_samples_per_slot: int = 200) -> None:
        super().__init__()
        check_positive("model", iters=iters, samples_per_slot=samples_per_slot, k_nearest=k_nearest)
        self.save_hyperparameters(logger=False)  # the loggers get the composed config once (pipeline.run)
        self.net = ProtoDepthNet(**(net or {}))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def _normalised(self, batch: dict) -> torch.Tensor:
        return (batch["points"] - batch["centre"][:, None]) / batch["radius"][:, None, None]

    def _surface(self, out: dict, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_points(out["verts"], self.net.prototypes.faces, n, generator)  # (B, K, n, 3)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        out = self.net(batch["depth"], looped=hp.looped_transform)
        with phase("sample"):
            pred = self._surface(out, hp.samples_per_slot)
        with phase("chamfer"):
            terms = hybrid_chamfer(pred, self._normalised(batch), out["trans"], hp.k_nearest, hp.w_target, hp.w_slot,
                                   hp.w_repulse, hp.repulse_margin, dense=hp.dense_chamfer)
        with phase("regularisers"):
            reg = self.net.prototypes.regularisers()
            loss = terms["loss"] + hp.w_edge * reg["edge"] + hp.w_normal * reg["normal"] + hp.w_laplacian * reg["laplacian"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss ({loss.item()}) at step {self.global_step}; "
                                         "stopping before the optimizer step, so the last checkpoint is intact")
        with phase("log"):
            self.log_dict({"train/loss": loss.detach(), **{f"train/{k}": v.detach() for k, v in {**terms, **reg}.items()
                                                            if k != "loss"}}, prog_bar=False, batch_size=pred.shape[0])
        return loss

    @torch.no_grad()
    def _score(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Predicted surface points in the camera frame (B, K, S, 3) and the bidirectional Chamfer (B,)."""
        out = self.net(batch["depth"])
        with phase("sample"):
            g = torch.Generator(device=self.device).manual_seed(0)
            pred = self._surface(out, self.hparams.eval_samples_per_slot, g)
            pred = pred * batch["radius"][:, None, None, None] + batch["centre"][:, None, None]
        b, k, s, _ = pred.shape
        with phase("chamfer"):
            cd = chamfer(pred.reshape(b, k * s, 3), batch["points"])
        return {"pred": pred, "chamfer": cd}, out["weights"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        scores, _ = self._score(batch)
        with phase("log"):
            self.log_eval({"val/chamfer": scores["chamfer"].mean()}, batch_size=batch["points"].shape[0])

    def on_test_epoch_start(self) -> None:
        self._test_rows: dict[int, dict] = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        scores, _ = self._score(batch)
        cover = slot_coverage(scores["pred"], batch["points"])  # (B, K)
        for i in range(batch["depth"].shape[0]):
            index = int(batch["index"][i])
            files = self._save_overlay(batch["depth"][i, 0], scores["pred"][i], index)
            self._test_rows[index] = {"map": index, "test/chamfer": float(scores["chamfer"][i]),
                                      "test/slots_used": float((cover[i] >= 0.01).sum()),
                                      "coverage": cover[i].tolist(), "files": files}

    def on_test_epoch_end(self) -> None:
        """Means over the unique test maps; per-map rows -> test_scores.json, and per-slot coverage (the share of
        depth points each slot explains), per map and averaged -> test_coverage.json."""
        rows = finish_test(self, self._test_rows)
        if self.trainer.is_global_zero and rows:
            cover = torch.tensor([r["coverage"] for r in rows])
            (Path(self.trainer.default_root_dir) / "test_coverage.json").write_text(json.dumps(
                {"mean_per_slot": cover.mean(0).tolist(), "per_map": cover.tolist()}, indent=1))

    def _save_overlay(self, depth: torch.Tensor, pred: torch.Tensor, index: int) -> list[str]:
        """The depth map (near bright) beside the same map with each slot's surface points drawn in its colour;
        returns the file (relative to the run dir)."""
        k = self.trainer.datamodule.intrinsics if self.trainer.datamodule is not None else None
        if k is None:
            return []
        gray = depth_to_gray(depth, (depth > 0).to(depth.dtype))  # (H, W, 3); no measurement: black
        base = (gray.cpu().numpy() * 255).astype(np.uint8)
        over = base.copy()
        h, w = depth.shape
        colours = slot_colours(pred.shape[0])
        K = intrinsics_matrix(k["fx"], k["fy"], k["cx"], k["cy"])
        uv = (project_points(pred, K, min_depth=1e-6)[0] - 0.5).round().long().cpu()  # (K, S, 2) pixel indices
        for slot in range(pred.shape[0]):
            u, v = uv[slot, :, 0], uv[slot, :, 1]
            ok = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (pred[slot, :, 2].cpu() > 0)
            over[v[ok].numpy(), u[ok].numpy()] = colours[slot]
        folder = Path(self.trainer.default_root_dir) / "test_images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([base, over], 1)).save(folder / f"{index:03d}_slots.png")
        return [f"test_images/{index:03d}_slots.png"]
