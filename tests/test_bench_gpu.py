"""``python bench/gpu.py --tiny``: the GPU benchmark's own code at toy sizes on this machine (Triton under its
interpreter), so the one command a GPU session runs is known to work before a GPU is lent."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed (pip install -e '.[test]')")
ROOT = Path(__file__).resolve().parents[1]
OPS = ("raw2alpha", "alpha_to_weights", "segment_sum", "distortion_loss", "ray_aabb", "sample_pts_on_rays",
       "total_variation_add_grad", "grid_adam_step")


@pytest.mark.slow
def test_gpu_bench_tiny_runs_every_section(tmp_path, data_dir):
    out = tmp_path / "gpu_tiny.md"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--data-dir", str(data_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "Skipped: nothing" in text and "FAIL" not in text and "failed" not in text, text
    for op in OPS:  # parity on every op, and a timing row for each
        assert re.search(rf"\| {op} \| [^|]+ \| ok \|", text), op
        assert re.search(rf"\| {op} \| [^|]+ \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", text), op
    psnr = dict(re.findall(r"\| (torch|triton) \| ([\d.]+) \| `\d\d:\d\d`", text))
    assert set(psnr) == {"torch", "triton"} and abs(float(psnr["torch"]) - float(psnr["triton"])) < 0.05, psnr
    for impl in ("eff_distloss", "ours, torch", "ours, triton"):
        assert re.search(rf"\| {re.escape(impl)}[^|]* \| [\d.]+ ms / ", text), impl
    assert re.search(r"\| NeRF \| 4 \| [\d.]+ \| 21 \| [\d.]+ \|", text) and re.search(r"\| NeuS \| 5 \| [\d.]+ \| 60 \|", text)
    # PU-INN's row: trained for its time budget, then tested (steps taken, steps/s, CD and HD per test shape)
    pu = re.search(r"PU-INN, generated patches [^\n]*\n\n\|[^\n]*\n\|[^\n]*\n(\|[^\n]*)", text)
    assert pu and re.match(r"\| [1-9]\d* \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", pu.group(1)), text
    for method in ("DVGO", "NeRF", "NeuS", "PU-INN", "Proto-Depth"):
        assert re.search(rf"\| {method} \| 6 \| -?[\d.]+ \| (True|False) \|", text), method
