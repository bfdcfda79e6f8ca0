"""Kernel parity: every op's Triton implementation equals the torch reference on values and gradients
(float32 and float64), on ragged rays (0, 1 and many samples); the references equal independent
definitions (brute force, O(N^2), autograd of the regulariser, torch's Adam). Select with ``pytest -k kernel``.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set in conftest before triton loads).
"""
from __future__ import annotations

import pytest
import torch

from src import kernels
from src.kernels import reference

triton = pytest.importorskip("triton", reason="triton not installed (pip install -e '.[test]')")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64]
COUNTS = [0, 1, 7, 0, 40, 2, 1, 0, 13]  # empty rays, single samples, many samples


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def ragged(counts=COUNTS, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ray_id = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return torch.rand(ray_id.numel(), generator=g, dtype=dtype).to(DEV), ray_id.to(DEV)


def both(op, *args):
    """The op under the torch and the triton backend (each on its own copy of the inputs: some ops work in place)."""
    def fresh():
        return [a.clone() if torch.is_tensor(a) else a for a in args]

    with kernels.use_backend("torch"):
        ref = getattr(kernels, op)(*fresh())
    with kernels.use_backend("triton"):
        out = getattr(kernels, op)(*fresh())
        assert kernels.used_backends()[op] == "triton"
    return ref, out


def grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs)


def assert_same_grads(loss_fn, inputs, dtype):
    """Input gradients of ``loss_fn`` under the triton backend equal those under torch."""
    g = {}
    for b in ("torch", "triton"):
        with kernels.use_backend(b):
            g[b] = grads(loss_fn, inputs)[1]
    for a, e in zip(g["triton"], g["torch"]):
        torch.testing.assert_close(a, e, **tol(dtype))


# ------------------------------------------------------------------------------------------ raw2alpha
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_raw2alpha_values_and_gradients(dtype):
    # from alpha ~1e-9 (DVGO's coarse alpha_init 1e-6 lives here) to alpha ~1
    x = torch.linspace(-25, 12, 3001, dtype=dtype, device=DEV)
    shift, interval = -13.8, 0.5
    ref, out = both("raw2alpha", x, shift, interval)
    torch.testing.assert_close(out, ref, **tol(dtype))
    assert (out[:10] > 0).all()  # tiny alphas are resolved, not rounded to 0
    w = torch.randn_like(x)
    assert_same_grads(lambda d: (kernels.raw2alpha(d, shift, interval) * w).sum(), [x], dtype)


def test_kernel_raw2alpha_reference_gradcheck_and_definition():
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: reference.raw2alpha(d, -2.0, 0.7), (x,))
    # DVGO's definition: 1 - (1 + exp(x + shift))^(-interval)
    torch.testing.assert_close(reference.raw2alpha(x, -2.0, 0.7), 1 - (1 + torch.exp(x - 2.0)) ** -0.7)


# ----------------------------------------------------------------------------------- alpha_to_weights
def brute_force_weights(alpha, ray_id, n_rays):
    w, T, T_last = [], [], []
    for r in range(n_rays):
        t = torch.ones((), dtype=alpha.dtype, device=alpha.device)
        for i in (ray_id == r).nonzero()[:, 0].tolist():
            T.append(t)
            w.append(t * alpha[i])
            t = t * (1 - alpha[i])
        T_last.append(t)
    return torch.stack(w), torch.stack(T), torch.stack(T_last)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_alpha_to_weights_values_and_gradients(dtype):
    alpha, ray_id = ragged(dtype=dtype)
    alpha[3] = 1.0  # an opaque sample mid-ray: everything behind it gets zero weight
    n = len(COUNTS)
    ref, out = both("alpha_to_weights", alpha, ray_id, n)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(dtype))
    for a, b in zip(ref, brute_force_weights(alpha, ray_id, n)):
        torch.testing.assert_close(a, b, **tol(dtype))
    # a loss through all three outputs exercises every gradient path
    cw, cT, cL = torch.randn_like(alpha), torch.randn_like(alpha), torch.randn(n, dtype=dtype, device=DEV)

    def loss(a):
        w, T, T_last = kernels.alpha_to_weights(a, ray_id, n)
        return (w * cw).sum() + (T * cT).sum() + (T_last * cL).sum()

    assert_same_grads(loss, [alpha], dtype)


def test_kernel_alpha_to_weights_gradcheck():
    alpha, ray_id = ragged([3, 0, 5, 1], dtype=torch.float64)
    alpha = (alpha * 0.9).requires_grad_(True)
    for b in ("torch", "triton"):
        with kernels.use_backend(b):
            assert torch.autograd.gradcheck(lambda a: torch.cat([o.flatten() for o in kernels.alpha_to_weights(a, ray_id, 4)]),
                                            (alpha,))


def brute_force_terminated_weights(alpha, ray_id, n_rays, stop_T):
    """DVGO's CUDA loop: composite, and stop a ray once its transmittance falls below stop_T."""
    w, T_last = torch.zeros_like(alpha), []
    for r in range(n_rays):
        t = 1.0
        for i in (ray_id == r).nonzero()[:, 0].tolist():
            w[i] = t * alpha[i]
            t = t * (1 - float(alpha[i]))
            if t < stop_T:
                break
        T_last.append(t)
    return w, torch.tensor(T_last, dtype=alpha.dtype, device=alpha.device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_alpha_to_weights_early_termination(dtype):
    alpha, ray_id = ragged(dtype=dtype, seed=9)
    alpha = alpha * 0.6 + 0.2  # opaque enough that the long rays terminate
    n, stop = len(COUNTS), 1e-3
    ref, out = both("alpha_to_weights", alpha, ray_id, n, stop)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(dtype))
    w_bf, T_last_bf = brute_force_terminated_weights(alpha, ray_id, n, stop)
    torch.testing.assert_close(ref[0], w_bf, **tol(dtype))
    torch.testing.assert_close(ref[2], T_last_bf, **tol(dtype))
    dead = ref[1] < stop
    assert dead.sum() > 10 and (ref[0][dead] == 0).all()  # terminated samples: weight 0
    full = kernels.alpha_to_weights(alpha, ray_id, n)
    assert (ref[2] - full[2]).abs().max() < stop  # what termination leaves out is below stop_T per ray
    cw, cL = torch.randn_like(alpha), torch.randn(n, dtype=dtype, device=DEV)

    def loss(a):
        w, T, T_last = kernels.alpha_to_weights(a, ray_id, n, stop)
        return (w * cw).sum() + (T_last * cL).sum()

    assert_same_grads(loss, [alpha], dtype)
    g = grads(loss, [alpha])[1][0]
    assert (g[dead] == 0).all()  # no gradient reaches samples past the termination


# ---------------------------------------------------------------------------------------- segment_sum
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (3,), (12,)])
def test_kernel_segment_sum_values_and_gradients(dtype, shape):
    _, ray_id = ragged()
    values = torch.randn(ray_id.numel(), *shape, dtype=dtype, device=DEV)
    n = len(COUNTS)
    ref, out = both("segment_sum", values, ray_id, n)
    torch.testing.assert_close(out, ref, **tol(dtype))
    brute = torch.stack([values[ray_id == r].sum(0) for r in range(n)])
    torch.testing.assert_close(ref, brute, **tol(dtype))
    c = torch.randn_like(ref)
    assert_same_grads(lambda v: (kernels.segment_sum(v, ray_id, n) * c).sum(), [values], dtype)


def test_kernel_segment_sum_gradcheck():
    _, ray_id = ragged([2, 0, 4])
    v = torch.randn(6, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    with kernels.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda x: kernels.segment_sum(x, ray_id, 3), (v,))


# --------------------------------------------------------------------------- ray-box and ray sampling
def random_rays(n=300, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    o = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 6
    d = torch.randn(n, 3, generator=g, dtype=dtype)
    d[:5, 0] = 0.0  # axis-parallel rays (the slab test's division by zero)
    d[5:8] = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    return o.to(DEV), d.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_ray_aabb(dtype):
    o, d = random_rays(dtype=dtype)
    lo = torch.tensor([-1.0, -0.5, -0.8], dtype=dtype, device=DEV)
    hi = torch.tensor([1.2, 0.7, 0.9], dtype=dtype, device=DEV)
    ref, out = both("ray_aabb", o, d, lo, hi, 0.1, 8.0)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **tol(dtype))
    assert 0 < int(ref[2].sum()) < len(o)  # some rays hit, some miss
    t_min, t_max, hit = ref  # hits enter and leave the box (within tolerance) where the slab test says
    p_in, p_out = o + d * t_min[:, None], o + d * t_max[:, None]
    eps = 1e-4
    assert ((p_in[hit] >= lo - eps) & (p_in[hit] <= hi + eps)).all()
    assert ((p_out[hit] >= lo - eps) & (p_out[hit] <= hi + eps)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_sample_pts_on_rays(dtype):
    o, d = random_rays(dtype=dtype)
    lo = torch.tensor([-1.0, -0.5, -0.8], dtype=dtype, device=DEV)
    hi = torch.tensor([1.2, 0.7, 0.9], dtype=dtype, device=DEV)
    ref, out = both("sample_pts_on_rays", o, d, lo, hi, 0.1, 1e9, 0.01)
    assert ref["pts"].shape[0] > 2000 and (ref["n_steps"] == 0).any()  # many samples; some rays miss
    for k in ("ray_id", "step_id", "n_steps"):
        assert torch.equal(out[k], ref[k]), k
    for k in ("pts", "t"):
        torch.testing.assert_close(out[k], ref[k], **tol(dtype))


# --------------------------------------------------------------------------------- total variation
def huber_tv(p, wx, wy, wz):
    """The regulariser whose gradient DVGO's TV adds: smooth-L1 (delta 1) of neighbour differences."""
    def h(x):
        return torch.where(x.abs() <= 1, 0.5 * x * x, x.abs() - 0.5).sum()
    return (wx * h(p[..., 1:, :, :] - p[..., :-1, :, :]) + wy * h(p[..., :, 1:, :] - p[..., :, :-1, :])
            + wz * h(p[..., :, :, 1:] - p[..., :, :, :-1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [True, False])
def test_kernel_total_variation_add_grad(dtype, dense):
    g = torch.Generator().manual_seed(3)
    param = (torch.randn(1, 2, 5, 6, 7, generator=g, dtype=dtype) * 1.5).to(DEV)  # some |diffs| > 1: clamped
    grad = torch.randn(1, 2, 5, 6, 7, generator=g, dtype=dtype).to(DEV)
    grad[torch.rand(grad.shape, generator=g).to(DEV) < 0.5] = 0  # untouched voxels
    w = (0.3, 0.2, 0.1)
    ref, out = both("total_variation_add_grad", param, grad, *w, dense)
    torch.testing.assert_close(out, ref, **tol(dtype))
    # the reference adds exactly the gradient of the smooth-L1 TV with DVGO's weights / 6 (everywhere, or
    # where grad != 0): DVGO's CUDA op divides the weights by 6, so its configs' TV weights port unchanged
    p = param.clone().requires_grad_(True)
    (tv_grad,) = torch.autograd.grad(huber_tv(p, *(x / 6 for x in w)), p)
    expect = grad + (tv_grad if dense else torch.where(grad != 0, tv_grad, torch.zeros_like(tv_grad)))
    torch.testing.assert_close(ref, expect, **tol(dtype))


# --------------------------------------------------------------------------------- distortion loss
def quadratic_distortion(w, s, interval, ray_id, n_rays):
    """Seed 003's O(N^2) ``original_distloss`` on the padded layout (zero-weight padding adds nothing)."""
    pos, counts, _ = reference.ray_layout(ray_id, n_rays)
    width = max(int(counts.max()), 1)
    W = w.new_zeros(n_rays, width).index_put((ray_id, pos), w)
    M = s.new_zeros(n_rays, width).index_put((ray_id, pos), s)
    iv = interval if not torch.is_tensor(interval) else interval.new_zeros(n_rays, width).index_put((ray_id, pos), interval)
    return reference.distortion_loss_quadratic(W, M, iv)


def sorted_midpoints(ray_id, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(ray_id.numel(), generator=g, dtype=dtype).to(DEV)
    order = torch.argsort(ray_id.to(torch.float64) * 10 + s.to(torch.float64))  # increasing within each ray
    return s[order]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample_interval", [False, True])
def test_kernel_distortion_loss_equals_quadratic_definition(dtype, per_sample_interval):
    w, ray_id = ragged(dtype=dtype, seed=4)
    s = sorted_midpoints(ray_id, dtype)
    n = len(COUNTS)
    interval = (torch.rand_like(w) * 0.1) if per_sample_interval else 0.02
    values, gradients = {}, {}
    for b in ("torch", "triton"):
        with kernels.use_backend(b):
            values[b], gradients[b] = grads(lambda w_, s_: kernels.distortion_loss(w_, s_, interval, ray_id, n), [w, s])
    q_value, q_grads = grads(lambda w_, s_: quadratic_distortion(w_, s_, interval, ray_id, n), [w, s])
    for b in ("torch", "triton"):
        torch.testing.assert_close(values[b], q_value, **tol(dtype))
        for a, e in zip(gradients[b], q_grads):
            torch.testing.assert_close(a, e, **tol(dtype))


def test_kernel_distortion_loss_gradcheck_and_package_agreement():
    w, ray_id = ragged([3, 0, 6, 1], dtype=torch.float64, seed=5)
    s = sorted_midpoints(ray_id, torch.float64)
    interval = torch.rand_like(w) * 0.1
    inputs = (w.requires_grad_(True), s.requires_grad_(True), interval.requires_grad_(True))
    for b in ("torch", "triton"):
        with kernels.use_backend(b):
            assert torch.autograd.gradcheck(lambda a, c, i: kernels.distortion_loss(a, c, i, ray_id, 4), inputs)
    # torch_efficient_distloss's O(N) eff_distloss (the package DVGO uses) on the padded layout
    from torch_efficient_distloss import eff_distloss
    B, N = 64, 48
    g = torch.Generator().manual_seed(6)
    wp = torch.rand(B, N, generator=g, dtype=torch.float64)
    mp = torch.sort(torch.rand(B, N, generator=g, dtype=torch.float64), -1).values
    rid = torch.arange(B).repeat_interleave(N)
    expect = eff_distloss(wp, mp, 1 / N)
    for b in ("torch", "triton"):
        with kernels.use_backend(b):
            got = kernels.distortion_loss(wp.flatten().to(DEV), mp.flatten().to(DEV), 1 / N, rid.to(DEV), B)
        torch.testing.assert_close(got.cpu(), expect)


# ------------------------------------------------------------------------------------------ grid Adam
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("skip_zero_grad", [False, True])
@pytest.mark.parametrize("per_lr", [False, True])
def test_kernel_grid_adam(dtype, skip_zero_grad, per_lr):
    from src.kernels.grid_adam import GridAdam

    g = torch.Generator().manual_seed(7)
    init = torch.randn(1, 3, 6, 5, 4, generator=g, dtype=dtype).to(DEV)
    lr_map = torch.rand(1, 1, 6, 5, 4, generator=g, dtype=dtype).to(DEV) if per_lr else None
    grads_seq = []
    for _ in range(4):
        gr = torch.randn(init.shape, generator=g, dtype=dtype).to(DEV)
        gr[torch.rand(gr.shape, generator=g).to(DEV) < 0.4] = 0
        grads_seq.append(gr)
    result = {}
    for b in ("torch", "triton"):
        p = torch.nn.Parameter(init.clone())
        opt = GridAdam([{"params": [p], "lr": 0.1, "skip_zero_grad": skip_zero_grad, "per_lr": lr_map}])
        with kernels.use_backend(b):
            for gr in grads_seq:
                p.grad = gr.clone()
                opt.step()
        result[b] = (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])
    for a, e in zip(result["triton"], result["torch"]):
        torch.testing.assert_close(a, e, **tol(dtype))
    if skip_zero_grad:  # a voxel no ray touched in any step never moved
        never = torch.stack([gr == 0 for gr in grads_seq]).all(0)
        assert never.any() and torch.equal(result["torch"][0][never], init[never])


def test_kernel_grid_adam_reference_is_adam():
    """Without masking or per-voxel rates, the update is Adam's (eps negligible)."""
    from src.kernels.grid_adam import GridAdam

    g = torch.Generator().manual_seed(8)
    init = torch.randn(50, generator=g, dtype=torch.float64)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours = GridAdam([a], lr=0.05, betas=(0.9, 0.99), eps=1e-30)
    adam = torch.optim.Adam([b], lr=0.05, betas=(0.9, 0.99), eps=1e-30)
    for _ in range(5):
        gr = torch.randn(50, generator=g, dtype=torch.float64)
        a.grad, b.grad = gr.clone(), gr.clone()
        with kernels.use_backend("torch"):
            ours.step()
        adam.step()
    torch.testing.assert_close(a.detach(), b.detach())


# ---------------------------------------------------------------------------------------- the switch
def test_kernel_backend_switch_errors_and_records(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        kernels.set_backend("cuda")
    with pytest.raises(KeyError, match="unknown kernel op 'raw2alpa'"):
        kernels.set_backend("torch", raw2alpa="triton")
    x = torch.zeros(4)
    with kernels.use_backend("auto", segment_sum="torch"):
        kernels.raw2alpha(x, 0.0, 1.0)
        used = kernels.used_backends()
        assert used["raw2alpha"] == "torch"  # auto on a CPU tensor
        assert used["segment_sum"] == "torch (not called)"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        kernels.raw2alpha(x, 0.0, 1.0)
    assert kernels.active_backends()["raw2alpha"] == "auto"  # use_backend restores the setting


# ------------------------------------------------------------------------------ guarded auto
@pytest.fixture
def auto_on_cpu(monkeypatch):
    """``auto`` treats CPU tensors as it treats CUDA ones (Triton under the interpreter), so the guard runs."""
    monkeypatch.setattr(kernels, "_auto_eligible", lambda tensor: True)
    from src.kernels import triton_ops
    return triton_ops


def test_guarded_auto_uses_a_kernel_that_passes_its_check(auto_on_cpu):
    x = torch.linspace(-5, 5, 101, device=DEV)
    with kernels.use_backend("auto"):
        out = kernels.raw2alpha(x, -1.0, 0.5)
        assert kernels.used_backends()["raw2alpha"] == "triton"
    torch.testing.assert_close(out, reference.raw2alpha(x, -1.0, 0.5), **tol(torch.float32))


@pytest.mark.parametrize("fault", ["raises", "wrong values", "wrong gradient"])
def test_guarded_auto_falls_back_to_the_reference_and_says_why(auto_on_cpu, monkeypatch, caplog, fault):
    alpha, ray_id = ragged(seed=11)
    n = len(COUNTS)
    good = auto_on_cpu.alpha_to_weights

    def broken(a, rid, n_rays, stop_T=0.0):
        if fault == "raises":
            raise RuntimeError("could not find LLVM intrinsic (planted)")
        w, T, T_last = good(a, rid, n_rays, stop_T)
        if fault == "wrong values":
            return w * 1.01, T, T_last
        return w + (a - a.detach()) * 0.5, T, T_last  # same values, an extra gradient term

    monkeypatch.setattr(auto_on_cpu, "alpha_to_weights", broken)
    caplog.set_level("WARNING", logger="src.kernels")
    with kernels.use_backend("auto"):
        out = kernels.alpha_to_weights(alpha, ray_id, n)
        used = kernels.used_backends()["alpha_to_weights"]
        again = kernels.alpha_to_weights(alpha, ray_id, n)  # the verdict holds: no second check
    assert used.startswith("torch (fallback: ")
    expect = {"raises": "RuntimeError: could not find LLVM intrinsic", "wrong values": "mismatch: ",
              "wrong gradient": "mismatch: 0 output and"}[fault]
    assert expect in used, used
    assert sum("alpha_to_weights" in r.message and "failed its check" in r.message for r in caplog.records) == 1
    for a, b in zip(out, reference.alpha_to_weights(alpha, ray_id, n)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the reference's own result
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    with kernels.use_backend("triton"):  # triton stays strict: the planted fault is not hidden
        if fault == "raises":
            with pytest.raises(RuntimeError, match="planted"):
                kernels.alpha_to_weights(alpha, ray_id, n)
        else:
            assert not torch.equal(kernels.alpha_to_weights(alpha, ray_id, n)[0], out[0]) or fault == "wrong gradient"


@pytest.mark.slow
def test_guarded_fallback_leaves_a_run_unchanged(auto_on_cpu, monkeypatch, make_cfg, tmp_path):
    """A DVGO run whose alpha_to_weights kernel is broken under auto ends with the metrics of a torch run,
    and metrics.json says which op fell back and why."""
    from src.pipeline import run

    short = ("experiment=dvgo_smoke", "model.coarse.iters=40", "model.fine.iters=40", "model.coarse.alpha_init=0.01",
             "model.fine.pg_scale=[20]", "trainer.val_check_interval=80", "callbacks.mesh=null")
    torch_run = run(make_cfg(*short, "kernels=torch", out=tmp_path / "torch"))

    def broken(*args):
        raise RuntimeError("planted compile error")

    monkeypatch.setattr(auto_on_cpu, "alpha_to_weights", broken)
    guarded = run(make_cfg(*short, "kernels=torch", "kernels.ops.alpha_to_weights=auto", out=tmp_path / "auto"))
    assert guarded["kernels/alpha_to_weights"] == "torch (fallback: RuntimeError: planted compile error)"
    for key in ("test/psnr", "test/ssim", "val/psnr"):
        assert guarded[key] == torch_run[key], key


def test_kernel_ab_compares_sample_sets_that_differ_at_the_boundary(auto_on_cpu, monkeypatch, tmp_path):
    """A GPU may place a boundary sample differently: the A/B callback matches samples by (ray, step),
    counts the difference, and still fails a kernel that moves many samples - without crashing on the
    differing sizes."""
    from src.callbacks.kernel_ab import KernelAB

    o, d = random_rays()
    lo, hi = torch.tensor([-1.0, -0.5, -0.8], device=DEV), torch.tensor([1.2, 0.7, 0.9], device=DEV)
    good = auto_on_cpu.sample_pts_on_rays
    drop = {"n": 1}

    def drops_samples(*args):
        out = good(*args)
        keep = torch.ones(out["ray_id"].numel(), dtype=torch.bool, device=DEV)
        keep[torch.arange(drop["n"]) * 37 + 5] = False
        return {k: (v if k == "n_steps" else v[keep]) for k, v in out.items()}

    monkeypatch.setattr(auto_on_cpu, "sample_pts_on_rays", drops_samples)
    args = {"sample_pts_on_rays": (o, d, lo, hi, 0.1, 1e9, 0.01)}
    row = KernelAB(str(tmp_path), reps=1).compare(args)[0]
    assert row["parity"] == "ok" and row["n_differ"] == 1, row
    drop["n"] = 40
    row = KernelAB(str(tmp_path), reps=1).compare(args)[-1]
    assert row["parity"].startswith("40 output") and row["n_differ"] == 40, row
    assert "| sample_pts_on_rays | triton |" in (tmp_path / "kernel_ab.txt").read_text()


# ------------------------------------------------------------------------------ DVGO end to end
class LossRecorder(__import__("lightning").Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.mark.slow
def test_kernel_dvgo_training_steps_match_torch(make_cfg, tmp_path):
    """A few DVGO steps (coarse, then fine with a progressive-scaling step) on a tiny generated scene,
    with TV and distortion switched on so every op runs: same losses with kernels=triton as kernels=torch."""
    import lightning as L
    from hydra.utils import instantiate

    losses, used = {}, {}
    for backend in ("torch", "triton"):
        cfg = make_cfg("experiment=dvgo_smoke", "model.n_rand=256", "model.coarse.iters=5", "model.fine.iters=5",
                       "model.coarse.alpha_init=0.01",  # five steps would leave no voxel above bbox_thres
                       "model.fine.pg_scale=[3]", "model.weight_distortion=0.01", "model.weight_tv_density=1e-5",
                       "model.weight_tv_k0=1e-6", "model.tv_before=1000", "model.tv_dense_before=3",
                       out=tmp_path / backend)
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        L.seed_everything(0)  # the same MLP initialisation for both runs
        model = instantiate(cfg.model, _convert_="all")
        rec = LossRecorder()
        trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[rec], accelerator="cpu")
        with kernels.use_backend(backend):
            trainer.fit(model, datamodule=dm)
            used[backend] = kernels.used_backends()
        losses[backend] = rec.losses
    assert len(losses["torch"]) == 10
    ran = ("raw2alpha", "alpha_to_weights", "segment_sum", "sample_pts_on_rays", "total_variation_add_grad",
           "distortion_loss", "grid_adam_step")
    assert all(used["triton"][op] == "triton" for op in ran), used["triton"]
    assert all(used["torch"][op] == "torch" for op in ran), used["torch"]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4), losses


@pytest.mark.gpu
def test_auto_runs_every_triton_kernel_on_cuda_tensors_and_keeps_it():
    """On a GPU the default backend (guarded ``auto``) runs the compiled Triton kernels, not the interpreter's,
    checks each against the reference on its first call and keeps it: no op falls back on real CUDA tensors."""
    g = torch.Generator().manual_seed(0)
    n_rays, per_ray = 512, 24
    ray_id = torch.arange(n_rays).repeat_interleave(per_ray).to(DEV)  # DEV: the module's device (CUDA here)
    density = torch.randn(n_rays * per_ray, generator=g).to(DEV).requires_grad_()
    with kernels.use_backend("auto"):
        alpha = kernels.raw2alpha(density, -4.0, 0.5)
        weights, _, _ = kernels.alpha_to_weights(alpha, ray_id, n_rays, 1e-3)
        total = kernels.segment_sum(weights[:, None], ray_id, n_rays)
        used = kernels.used_backends()
    assert [used[op] for op in ("raw2alpha", "alpha_to_weights", "segment_sum")] == ["triton"] * 3, used
    ref_alpha = reference.raw2alpha(density, -4.0, 0.5)
    ref_total = reference.segment_sum(reference.alpha_to_weights(ref_alpha, ray_id, n_rays, 1e-3)[0][:, None], ray_id,
                                      n_rays)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
