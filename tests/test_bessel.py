import math

import numpy as np
import pytest
import scipy.special as sp
import torch

from third_party.bessel import ive, log_ive

# Log-spaced grid over the range the vMF concentration spans during training.
GRID = np.logspace(-3, 5, 4001)


def _rel_err(y: torch.Tensor, ref: np.ndarray) -> np.ndarray:
    return np.abs(y.detach().double().numpy() - ref) / np.abs(ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ive_nu9_matches_scipy(dtype):
    x = torch.tensor(GRID, dtype=dtype)
    y = ive(9, x)
    assert y.dtype == dtype and y.shape == x.shape
    # For float32 the reference is taken at the float32-rounded input, so only
    # the function's own error is measured.
    ref = sp.ive(9, x.double().numpy())
    # Ie_9(1e-3) ~ 5e-36 is still a normal float32, so every point is checked.
    assert np.all(ref > torch.finfo(dtype).tiny)
    err = _rel_err(y, ref)
    assert err.max() <= 1e-6
    if dtype == torch.float64:
        # Far tighter than required; guards against a silently degraded branch.
        assert err.max() <= 1e-12


@pytest.mark.parametrize("nu", [0, 0.5, 1, 2, 5, 12.5, 20])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ive_other_orders(nu, dtype):
    x = torch.tensor(GRID, dtype=dtype)
    ref = sp.ive(nu, x.double().numpy())
    # Large orders underflow float32 at the small end of the grid; compare only
    # where the true value is representable.
    mask = ref > torch.finfo(dtype).tiny
    assert mask.sum() > 0.6 * len(GRID)
    err = _rel_err(ive(nu, x), ref)[mask]
    assert err.max() <= 1e-6


def test_ive_half_integer_closed_form():
    # I_{1/2}(x) = sqrt(2/(pi x)) sinh(x), so Ie_{1/2}(x) = (1 - e^{-2x}) / sqrt(2 pi x).
    x = torch.tensor([1e-2, 0.7, 3.0, 24.0, 26.0, 300.0], dtype=torch.float64)
    ref = -torch.expm1(-2 * x) / torch.sqrt(2 * math.pi * x)
    torch.testing.assert_close(ive(0.5, x), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("nu", [0, 9, 20])
def test_ive_large_argument(nu):
    x = torch.logspace(6, 9, 50, dtype=torch.float64)
    y = ive(nu, x)
    assert torch.isfinite(y).all()
    assert _rel_err(y, sp.ive(nu, x.numpy())).max() <= 1e-12
    y32 = ive(nu, x.float())
    assert torch.isfinite(y32).all()
    assert _rel_err(y32, sp.ive(nu, x.float().double().numpy())).max() <= 1e-6


@pytest.mark.parametrize("nu", [0, 1, 9])
def test_log_ive_matches_scipy(nu):
    x = torch.tensor(GRID, dtype=torch.float64)
    ref = np.log(sp.ive(nu, GRID))
    np.testing.assert_allclose(log_ive(nu, x).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_log_ive_tiny_argument_stays_finite():
    x = torch.tensor([1e-30, 1e-20, 1e-10], dtype=torch.float32)
    # Ie_9 underflows float32 here, which is why log_ive exists.
    assert (ive(9, x) == 0).all()
    got = log_ive(9, x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # For tiny x the series is its first term: log Ie_9(x) ~ 9 log(x/2) - log(9!) - x.
    x64 = x.double()
    lead = 9 * torch.log(x64 / 2) - math.lgamma(10) - x64
    torch.testing.assert_close(got.double(), lead, rtol=1e-6, atol=0)
    # Where scipy itself is still representable in float64, compare directly.
    ref = np.log(sp.ive(9, x64.numpy()))
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-6)
    g, = torch.autograd.grad(log_ive(9, x.requires_grad_()).sum(), x)
    # d/dx log Ie_9 ~ 9/x - 1 for tiny x.
    torch.testing.assert_close(g.double(), 9 / x64 - 1, rtol=1e-6, atol=0)


GRAD_POINTS = [1e-3, 0.05, 1.0, 3.7, 40.0, 41.0, 50.0, 1e4]


@pytest.mark.parametrize("nu", [0, 1, 9])
def test_gradcheck(nu):
    x = torch.tensor(GRAD_POINTS, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ive(nu, t), (x,))
    assert torch.autograd.gradcheck(lambda t: log_ive(nu, t), (x,))


@pytest.mark.parametrize("nu", [0, 9])
def test_gradient_matches_recurrence_and_finite_differences(nu):
    x = torch.tensor(GRAD_POINTS, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(ive(nu, x).sum(), x)
    gl, = torch.autograd.grad(log_ive(nu, x).sum(), x)
    xd = np.array(GRAD_POINTS)
    prev = sp.ive(abs(nu - 1), xd)  # I_{-1} = I_1
    ref = prev - sp.ive(nu, xd) * (nu + xd) / xd
    # The recurrence cancels ~2x-fold at large x, so the reference itself is
    # only good to ~1e-16 * 2x.
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(gl.numpy(), ref / sp.ive(nu, xd), rtol=1e-10)
    # Central differences with a relative step.
    h = 1e-5 * xd
    fd = (sp.ive(nu, xd + h) - sp.ive(nu, xd - h)) / (2 * h)
    np.testing.assert_allclose(g.numpy(), fd, rtol=1e-6)
    with torch.no_grad():
        xt = torch.tensor(xd)
        ht = torch.tensor(h)
        fd_t = (ive(nu, xt + ht) - ive(nu, xt - ht)) / (2 * ht)
        fd_log = (log_ive(nu, xt + ht) - log_ive(nu, xt - ht)) / (2 * ht)
    torch.testing.assert_close(g, fd_t, rtol=1e-6, atol=0)
    torch.testing.assert_close(gl, fd_log, rtol=1e-6, atol=0)


def test_float32_gradient_dtype_and_value():
    x = torch.tensor([0.5, 30.0, 2e3], dtype=torch.float32, requires_grad=True)
    g, = torch.autograd.grad(ive(9, x).sum(), x)
    assert g.dtype == torch.float32
    xd = x.detach().double().numpy()
    ref = sp.ive(8, xd) - sp.ive(9, xd) * (9 + xd) / xd
    np.testing.assert_allclose(g.double().numpy(), ref, rtol=1e-5)


def test_output_follows_input_shape_dtype_device():
    x = torch.rand(2, 3, 4, dtype=torch.float32) * 100 + 1e-3
    for f in (ive, log_ive):
        y = f(9, x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        y64 = f(9, x.double())
        assert y64.dtype == torch.float64
    # Elementwise: reshaping the input reshapes the output.
    torch.testing.assert_close(ive(9, x).reshape(-1), ive(9, x.reshape(-1)))
    scalar = ive(9, torch.tensor(10.0))
    assert scalar.shape == () and math.isclose(scalar.item(), sp.ive(9, 10.0), rel_tol=1e-6)



# ---------------------------------------------------------------- the float32 path (MPS)

WIDE_GRID = np.logspace(-3, 9, 6001)


class DtypeRecorder(torch.overrides.TorchFunctionMode):
    """Records the dtype of every tensor a torch function returns while it is active."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.dtypes.add(item.dtype)
        return out


# (nu, bound on |log error| / (1 + |log Ie|), bound on the relative error of Ie): the
# series' float32 log terms grow with nu, and so does what they lose (module docstring).
FLOAT32_BOUNDS = [(0, 3e-6, 1e-5), (1, 3e-6, 1e-5), (9, 3e-6, 2e-5), (20, 2e-5, 1e-4)]


@pytest.mark.parametrize("nu, log_bound, ive_bound", FLOAT32_BOUNDS)
def test_float32_computation_against_float64(nu, log_bound, ive_bound):
    # The same float32 inputs for both, so only the internal precision differs.
    x32 = torch.tensor(WIDE_GRID, dtype=torch.float32).requires_grad_()
    x64 = x32.detach().double().requires_grad_()
    log32, log64 = log_ive(nu, x32, dtype=torch.float32), log_ive(nu, x64)
    assert log32.dtype == torch.float32
    err = (log32.double() - log64).abs() / (1 + log64.abs())
    assert err.max().item() <= log_bound
    # d/dx log Ie_nu = I'/I - 1 cancels near its zero (x ~ nu^2 / 2), hence the 1 + |.|.
    g32, = torch.autograd.grad(log32.sum(), x32)
    g64, = torch.autograd.grad(log64.sum(), x64)
    assert ((g32.double() - g64).abs() / (1 + g64.abs())).max().item() <= log_bound
    with torch.no_grad():
        ive32, ive64 = ive(nu, x32, dtype=torch.float32).double(), ive(nu, x64)
    normal = ive64 > torch.finfo(torch.float32).tiny
    assert normal.sum() > 0.75 * len(WIDE_GRID)
    assert ((ive32 - ive64).abs() / ive64)[normal].max().item() <= ive_bound


def test_float32_computation_makes_no_float64_tensor():
    x = torch.tensor([0.0, 1e-30, 0.3, 40.0, 41.0, 1e9], requires_grad=True)
    with DtypeRecorder() as recorded:
        log_ive(9, x, dtype=torch.float32).sum().backward()
        ive(9, x.detach(), dtype=torch.float32)
    # float32 values and the branch masks, nothing that MPS would refuse.
    assert recorded.dtypes == {torch.float32, torch.bool}
    assert torch.isfinite(x.grad).all()
    # The recorder does see a float64 computation.
    with DtypeRecorder() as recorded:
        log_ive(9, x.detach())
    assert torch.float64 in recorded.dtypes


def test_float32_at_zero_is_the_floor_value():
    # x = 0 is clamped to 1e-35 in float32; there Ie_9 is its first series term.
    got = log_ive(9, torch.zeros(1), dtype=torch.float32)
    expected = 9 * math.log(0.5e-35) - math.lgamma(10) - 1e-35
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_unsupported_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="float64 or torch.float32"):
        log_ive(9, torch.ones(2), dtype=torch.float16)
