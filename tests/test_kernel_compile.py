"""The GPU fast path compiles: every Triton kernel variant the dispatcher can launch, compiled ahead of time
for sm_80 (A100) and sm_90 (H100 / H200) on this CPU-only machine, as a GPU user's first launch would.

The compile runs in subprocesses (this process has ``TRITON_INTERPRET=1``, which replaces compiled kernels
by the interpreter).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed (pip install -e '.[test]')")
ROOT = Path(__file__).resolve().parents[1]

# the exactness check has teeth: the sampling kernel compiled *with* fp fusion must be caught
TEETH = """
from src.kernels import triton_ops
from src.kernels.compile_check import compile_variant
v = next(v for v in triton_ops.launch_variants() if v.name == "_sample_kernel")
row = compile_variant(v._replace(options={"enable_fp_fusion": True}), 90, exact=True)
print(row["ok"], row["error"])
"""


def _start(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_every_triton_kernel_variant_compiles_for_sm80_and_sm90():
    from src.kernels import triton_ops

    procs = {arch: _start(["-m", "src.kernels.compile_check", "--arch", arch, "--json"]) for arch in ("80", "90")}
    teeth = _start(["-c", TEETH])
    rows = []
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert out.strip(), f"compile_check sm_{arch} printed nothing:\n{err[-3000:]}"
        rows += json.loads(out.strip().splitlines()[-1])["rows"]
    failed = [f"{r['arch']} {r['kernel']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    variants = triton_ops.launch_variants()
    assert len(rows) == 2 * len(variants) and len(variants) >= 40

    # every kernel the wrappers launch (name[grid](...)) has variants listed, and each dtype is covered
    source = Path(triton_ops.__file__).read_text()
    launched = set(re.findall(r"\b(_\w+_kernel)\[", source))
    listed = {v.name for v in variants}
    assert launched and launched <= listed, f"launched but not in launch_variants(): {launched - listed}"
    jit_kernels = {name for name in re.findall(r"@triton\.jit\ndef (\w+)\(", source) if name.endswith("_kernel")}
    assert jit_kernels == listed, jit_kernels ^ listed
    for name in listed:
        dtypes = {v.types[0] for v in variants if v.name == name}
        assert dtypes == {"*fp32", "*fp64"}, (name, dtypes)

    out, err = teeth.communicate(timeout=300)
    assert out.startswith("False") and "fma" in out, out + err[-2000:]
