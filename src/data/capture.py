"""Your own capture to a trainable scene: ``python -m src.data.capture SOURCE OUT [--frames N]``.

SOURCE is a folder of photos or a video file (frames through the ffmpeg binary of ``imageio-ffmpeg``: the sharpest
frame of each of ``--frames`` equal stretches of the video, sharpness being the variance of the image's Laplacian).
COLMAP (through pycolmap, on the CPU or a GPU) then extracts SIFT features, matches them (every pair for up to
``--exhaustive-max`` images, else each image with its neighbours in order, as for a video), maps them incrementally
and undistorts the images. OUT (written into a temporary folder and renamed when complete, so a failed capture leaves
nothing) holds

    images/          the undistorted images, full size (pinhole camera)
    images_2/ _4/ _8/  the same, area-downscaled
    sparse/0/        the undistorted COLMAP model (cameras, images, points3D .bin)
    cameras_sphere.npz  the same cameras in NeuS's form (the sparse points' sphere as its region of interest)
    colmap/          the distorted model and COLMAP's database (to re-run COLMAP steps by hand)
    capture.json     the report below

and a report is printed: images registered of total, mean reprojection error, points, the scene type (forward-
facing, or 360 around an object) and the command that trains on it (``data=colmap data.root=OUT``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from src import stop
from src.data.errors import DataError

log = logging.getLogger("capture")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm")
DOWNSCALES = (2, 4, 8)


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image: low for blurred (moving-camera) frames."""
    g = rgb.astype(np.float32).mean(-1)
    lap = g[1:-1, 1:-1] * 4 - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def video_frames(video: Path, out_dir: Path, n_frames: int) -> list[Path]:
    """The sharpest frame of each of ``n_frames`` equal stretches of ``video``, as PNGs in ``out_dir``."""
    import imageio_ffmpeg

    try:
        total, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
        reader = imageio_ffmpeg.read_frames(str(video))
        meta = next(reader)
    except (RuntimeError, OSError, StopIteration) as e:
        raise DataError(f"{video}: not a readable video ({e})") from e
    if total < 1:
        raise DataError(f"{video}: the video has no frames")
    w, h = meta["size"]
    bounds = np.linspace(0, total, min(n_frames, total) + 1).astype(int)
    best: dict[int, tuple[float, np.ndarray]] = {}
    stretch = 0
    for i, raw in enumerate(reader):
        stop.check(f"reading {video.name}'s frames ({i + 1} of {total})")
        while stretch + 1 < len(bounds) - 1 and i >= bounds[stretch + 1]:
            stretch += 1
        frame = np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
        score = sharpness(frame[::2, ::2])
        if stretch not in best or score > best[stretch][0]:
            best[stretch] = (score, frame.copy())
    if not best:
        raise DataError(f"{video}: no frame could be decoded")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in sorted(best):
        path = out_dir / f"frame_{k:05d}.png"
        Image.fromarray(best[k][1]).save(path)
        files.append(path)
    log.info("%s: %d frames, kept the sharpest of each of %d stretches", video.name, total, len(files))
    return files


def check_images(folder: Path) -> list[Path]:
    """The photos of ``folder`` (sorted), each readable and all of one size."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    sizes: dict[tuple[int, int], list[str]] = {}
    for k, f in enumerate(files):
        stop.check(f"checking the photos ({k + 1} of {len(files)})")
        try:
            with Image.open(f) as im:
                im.verify()
            with Image.open(f) as im:
                sizes.setdefault(im.size, []).append(f.name)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{f}: not a readable image ({e}); remove it or replace it") from e
    if len(sizes) > 1:
        listing = "; ".join(f"{w}x{h}: {len(n)} ({', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
                            for (w, h), n in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
        raise DataError(f"{folder}: images of different sizes ({listing}); a capture is one camera at one size: "
                        "resize them alike or keep one size")
    return files


def downscale_images(src: Path, dst: Path, factor: int) -> None:
    """Area-downscaled copies of ``src``'s images in ``dst``, under the same names (the model's image names; a JPEG
    stays a JPEG, at quality 95)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        with Image.open(f) as im:
            size = (max(1, round(im.width / factor)), max(1, round(im.height / factor)))
            small = im.convert("RGB").resize(size, Image.Resampling.BOX)
        small.save(dst / f.name, **({"quality": 95} if f.suffix.lower() in (".jpg", ".jpeg") else {}))


def reconstruct(image_dir: Path, work: Path, sequential: bool, device: str = "auto", min_registered: float = 0.8):
    """COLMAP on ``image_dir``: features, matches, incremental mapping; the largest model and its statistics.
    Fewer than ``min_registered`` of the images registered is an error that names the others."""
    import pycolmap

    names = sorted(p.name for p in image_dir.iterdir())
    dev = {"auto": pycolmap.Device.auto, "cpu": pycolmap.Device.cpu, "cuda": pycolmap.Device.cuda}[device]
    db = work / "database.db"
    stages = []

    def stage(what: str, fn):
        stop.check(f"COLMAP's {what}")
        tic = time.perf_counter()
        log.info("[%d/4] %s ...", len(stages) + 1, what)
        out = fn()
        stages.append((what, time.perf_counter() - tic))
        log.info("[%d/4] %s: %.1f s", len(stages), what, stages[-1][1])
        return out

    stage("feature extraction", lambda: pycolmap.extract_features(db, image_dir, camera_mode=pycolmap.CameraMode.SINGLE,
                                                                   device=dev))
    if sequential:
        stage("sequential matching", lambda: pycolmap.match_sequential(db, device=dev))
    else:
        stage("exhaustive matching", lambda: pycolmap.match_exhaustive(db, device=dev))
    (work / "sparse").mkdir(parents=True, exist_ok=True)
    models = stage("incremental mapping", lambda: pycolmap.incremental_mapping(db, image_dir, work / "sparse"))
    if not models:
        raise DataError(f"{image_dir}: COLMAP found no reconstruction in {len(names)} images (too few matches "
                        "between them). What usually helps: more overlap between neighbouring photos (move less "
                        "between shots), more texture in view, sharper frames (--frames with a slower video)")
    key, rec = max(models.items(), key=lambda kv: kv[1].num_reg_images())
    registered = {im.name for im in rec.images.values() if im.has_pose}
    missing = [n for n in names if n not in registered]
    if len(registered) < min_registered * len(names):
        raise DataError(f"{image_dir}: COLMAP registered {len(registered)} of {len(names)} images (fewer than "
                        f"{min_registered:.0%}); not registered: {', '.join(missing[:10])}"
                        f"{' ...' if len(missing) > 10 else ''}. What usually helps: more overlap between "
                        "neighbouring images, sequential matching for a video (--sequential), fewer blurry frames")
    model_dir = work / "sparse" / str(key)
    return rec, model_dir, missing, stages


def capture(source: str | Path, out: str | Path, frames: int = 100, sequential: bool | None = None,
            exhaustive_max: int = 100, device: str = "auto", min_registered: float = 0.8) -> dict:
    """SOURCE (photo folder or video) to OUT (see the module); returns the report written to ``capture.json``."""
    import pycolmap

    from src.data.colmap import read_colmap, scene_type, write_neus_cameras

    source, out = Path(source), Path(out)
    if out.exists():
        raise DataError(f"{out} exists: the capture writes a new folder; choose another OUT or remove it")
    if not source.exists():
        raise DataError(f"{source}: no such folder or video")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tic = time.perf_counter()
    try:
        raw = tmp / "colmap" / "images"
        if source.is_dir():
            files = check_images(source)
            raw.mkdir(parents=True)
            for f in files:
                shutil.copy2(f, raw / f.name)
            is_video = False
        elif source.suffix.lower() in VIDEO_SUFFIXES:
            files = video_frames(source, raw, frames)
            is_video = True
        else:
            raise DataError(f"{source}: neither a folder of images nor a video ({', '.join(VIDEO_SUFFIXES)})")
        seq = is_video or len(files) > exhaustive_max if sequential is None else sequential
        rec, model_dir, missing, stages = reconstruct(raw, tmp / "colmap", seq, device, min_registered)
        stop.check("COLMAP's undistortion")
        tic_u = time.perf_counter()
        log.info("[4/4] undistortion ...")
        undist = tmp / "colmap" / "undistorted"
        pycolmap.undistort_images(str(undist), str(model_dir), str(raw))
        stages.append(("undistortion", time.perf_counter() - tic_u))
        log.info("[4/4] undistortion: %.1f s", stages[-1][1])
        (undist / "images").rename(tmp / "images")
        (tmp / "sparse").mkdir()
        (undist / "sparse").rename(tmp / "sparse" / "0")
        shutil.rmtree(undist)
        for f in DOWNSCALES:
            stop.check("downscaling the images")
            downscale_images(tmp / "images", tmp / f"images_{f}", f)
        model = read_colmap(tmp / "sparse" / "0")
        kind = scene_type(model["c2w"])
        write_neus_cameras(tmp)  # NeuS's form of the same cameras: data=neus data.root=OUT
        h, w = (int(v) for v in model["hw"][0])
        report = {
            "source": str(source), "images": len(files), "registered": len(model["names"]), "not_registered": missing,
            "mean_reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 3),
            "points": int(rec.num_points3D()), "scene_type": kind, "image_size": [w, h],
            "matching": "sequential" if seq else "exhaustive", "stages_s": {k: round(v, 1) for k, v in stages},
            "seconds": round(time.perf_counter() - tic, 1), "pycolmap": pycolmap.__version__,
        }
        factor = next((f for f in (1, *DOWNSCALES) if max(w, h) / f <= 1024), DOWNSCALES[-1])
        report["train"] = train_commands(out, kind, factor)
        (tmp / "capture.json").write_text(json.dumps(report, indent=2))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def train_commands(out: Path, kind: str, factor: int) -> list[str]:
    """What to run next on the capture at OUT."""
    data = f"data=colmap data.root={out}" + (f" data.factor={factor}" if factor > 1 else "")
    if kind == "forward-facing":
        return [f"python train.py model=nerf {data}", f"python train.py experiment=nerf_smoke {data}"]
    return [f"python train.py model=dvgo {data}", f"python train.py model=nerf {data}",
            f"python train.py model=neus data=neus data.root={out}"]


def format_report(r: dict, out: Path) -> str:
    lines = [f"capture {r['source']} -> {out}",
             f"  registered {r['registered']} of {r['images']} images"
             + (f" (not: {', '.join(r['not_registered'][:5])})" if r["not_registered"] else ""),
             f"  mean reprojection error {r['mean_reprojection_error_px']} px, {r['points']} points, "
             f"{r['image_size'][0]}x{r['image_size'][1]}, {r['matching']} matching, {r['seconds']} s",
             f"  scene: {r['scene_type']}",
             "  train on it:", *(f"    {c}" for c in r["train"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.data.capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder of photos or a video file")
    parser.add_argument("out", help="the scene folder to write (must not exist)")
    parser.add_argument("--frames", type=int, default=100, help="frames taken from a video (default 100)")
    match = parser.add_mutually_exclusive_group()
    match.add_argument("--sequential", dest="sequential", action="store_true", default=None,
                       help="match each image with its neighbours in order (default for a video)")
    match.add_argument("--exhaustive", dest="sequential", action="store_false", help="match every pair")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--min-registered", type=float, default=0.8,
                        help="the share of images that must register (default 0.8)")
    parser.add_argument("--verbose", action="store_true", help="COLMAP's own log lines too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.verbose:  # COLMAP logs every image and every bundle adjustment; the stages are reported here
        import pycolmap

        pycolmap.logging.minloglevel = pycolmap.logging.WARNING
    try:
        with stop.handling_signals():
            report = capture(args.source, args.out, args.frames, args.sequential, device=args.device,
                             min_registered=args.min_registered)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except stop.Stopped as e:
        print(f"{e}; nothing was written to {args.out}", file=sys.stderr)
        return e.exit_code
    print(format_report(report, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
