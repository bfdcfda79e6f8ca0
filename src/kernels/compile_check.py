"""Compile every Triton kernel variant the dispatcher can launch, ahead of time, for GPU targets, on any
machine (no GPU needed: Triton's bundled ptxas makes a real cubin).

    python -m src.kernels.compile_check                 # sm_80 and sm_90, a table of what compiled
    python -m src.kernels.compile_check --arch 90 --json

Besides compiling, it checks that the kernels which decide which samples exist (``triton_ops.EXACT``)
contain no fused multiply-add and no approximate division in their PTX, so a GPU computes their
samples as torch does. Exits 1 if any variant fails, printing the compiler's message.

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces compiled kernels); it unsets it for
itself when started as a script, and tests run it in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# PTX instructions that round differently from torch's separate IEEE operations
INEXACT_PTX = re.compile(r"\b((?:fma|mad)\.[.\w]*f(?:32|64)|div\.(?:approx|full)\.[.\w]*f32|rcp\.approx\.[.\w]*f32)\b")


def _attrs(backend, variant) -> dict:
    """Pointer arguments 16-byte aligned, as Triton's launcher specialises torch allocations."""
    parse = getattr(backend, "parse_attr", None)
    if parse is None:
        return {}
    return {(i,): parse("D") for i, t in enumerate(variant.types) if t.startswith("*")}


def compile_variant(variant: object, arch: int, exact: bool | None = None) -> dict:
    """Compile one variant for ``sm_<arch>``; ``exact`` (default: the variant's options disable fp fusion)
    also requires PTX free of fused multiply-adds and approximate division."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = variant.kernel
    names = list(fn.arg_names)
    runtime = [n for n in names if n not in variant.constexprs]
    row = {"kernel": variant.describe(), "arch": f"sm_{arch}", "ok": False, "error": "", "seconds": 0.0}
    if len(runtime) != len(variant.types):
        row["error"] = (f"variant lists {len(variant.types)} argument types, the kernel has {len(runtime)} "
                        f"non-constexpr parameters {runtime}")
        return row
    types = dict(zip(runtime, variant.types))
    signature = {n: types.get(n, "constexpr") for n in names}
    target = GPUTarget("cuda", arch, 32)
    tic = time.perf_counter()
    try:
        src = ASTSource(fn, signature, dict(variant.constexprs), _attrs(make_backend(target), variant))
        compiled = triton.compile(src, target=target, options=dict(variant.options))
        ptx = compiled.asm["ptx"]
        if exact if exact is not None else not variant.options.get("enable_fp_fusion", True):
            inexact = sorted(set(INEXACT_PTX.findall(ptx)))
            if inexact:
                raise RuntimeError(f"PTX of an exact kernel has {inexact}: it would round differently from torch")
        row["ok"] = True
    except Exception as e:  # noqa: BLE001 - every compiler failure is reported, with its message
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        row["error"] = f"{type(e).__name__}: " + " | ".join(lines[-6:])
    row["seconds"] = round(time.perf_counter() - tic, 2)
    return row


def check(archs: list[int]) -> list[dict]:
    """Compile every launched kernel variant for each compute capability in ``archs``: one result row each."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs compiled kernels: run it without TRITON_INTERPRET=1")
    from src.kernels import triton_ops

    return [compile_variant(v, arch) for arch in archs for v in triton_ops.launch_variants()]


def main(argv: list[str] | None = None) -> int:
    """The command line: compile, print the table, exit non-zero on any failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (80 = A100, 90 = H100/H200)")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    args = parser.parse_args(argv)
    import triton

    rows = check([int(a) for a in args.arch.split(",")])
    if args.json:
        print(json.dumps({"triton": triton.__version__, "rows": rows}))
    else:
        n_arch = len(args.arch.split(","))
        print(f"triton {triton.__version__}: {sum(r['ok'] for r in rows)} of {len(rows)} compiles succeeded "
              f"({len(rows) // n_arch} variants x {n_arch} targets)")
        for r in rows:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['arch']} {r['kernel']} ({r['seconds']} s) {r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
