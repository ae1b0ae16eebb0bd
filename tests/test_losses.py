"""Loss terms of docs/model.md §3-4 against hand computations and independent re-computations.

The hand examples use 2 codes, a 1x1 latent and D = 2; every number below is derived in the
comment next to it. Re-computations use plain torch/numpy/scipy formulas, never the code under
test.
"""
import math

import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F

from networks.losses import (arelbo_loss, learned_variance_loss, squared_error,
                             vmf_log_normalizer, vmf_reconstruction)
from networks.functional import (gaussian_logits, gaussian_quantize, neg_entropy_and_probs,
                                 perplexity, vmf_quantize)
from tests.helpers import gumbel_draw, make_input, make_model

MODES = ["train", "deterministic", "stochastic"]
# The variants with an encoder variance head (docs/model.md §3.1).
HEADS = ("gaussian_2", "gaussian_3", "gaussian_4")
NAMES = ["mnist_gauss_1", "fashion-mnist_gauss_1", "cifar10_gauss_1", "celeba_gauss_1",
         "celeba_gauss_2", "celeba_gauss_3", "celeba_gauss_4", "celebamask_vmf", "cifar10_vmf"]
TAU = torch.tensor(1.0)


def latent(*values):
    """One image with a 1x1 latent: B x D x 1 x 1."""
    return torch.tensor(values).reshape(1, -1, 1, 1)


# ---------------------------------------------------------------------------- Gaussian, by hand
#
# z = (1, 0); codes b_0 = (0, 0), b_1 = (2, 1); sigma_q^2 = 2 (variant I with s = 0: 1 + e^0),
# so w = 1/2.  |z - b_0|^2 = 1, |z - b_1|^2 = (1 - 2)^2 + (0 - 1)^2 = 2.
# Logits l = -1/2 * 1/2 * (1, 2) = (-0.25, -0.5).
# p_0 = 1 / (1 + e^-0.25) = 1 / 1.7788008 = 0.5621765, p_1 = 0.4378235.
# Discrete KL = p_0 ln p_0 + p_1 ln p_1 = 0.5621765 * (-0.5759433) + 0.4378235 * (-0.8259433)
#             = -0.3237800 - 0.3616153 = -0.6853953  (B = 1).
# Deterministic: argmax = code 0, z_hat = (0, 0): continuous KL = 1/2 * 1/2 * 1 = 0.25.
# Perplexity (deterministic, a = (1, 0)): exp(-ln(1 + 1e-7)) = 1 - 1e-7.
# Perplexity (stochastic, a = p): exp(-sum p ln(p + 1e-7)) = exp(0.6853953)
#   = 2 exp(0.6853953 - ln 2) = 2 exp(-0.0077519) = 2 * 0.9922781 = 1.984556.

Z = latent(1.0, 0.0)
BOOK = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
VAR = torch.tensor(2.0)
P0 = 1 / (1 + math.exp(-0.25))
KLD = P0 * math.log(P0) + (1 - P0) * math.log(1 - P0)


def test_gaussian_logits_by_hand():
    got = gaussian_logits(Z.reshape(1, 2), BOOK, torch.tensor([[0.5]]))
    assert torch.equal(got, torch.tensor([[-0.25, -0.5]]))  # exact in binary floating point


def test_discrete_kl_gradient_by_hand():
    # With two codes the KL is f(p_0) = p_0 ln p_0 + (1 - p_0) ln(1 - p_0), p_0 = sigmoid(l_0 - l_1):
    # df/dp_0 = ln(p_0 / p_1) = l_0 - l_1 = 0.25 and dp_0/dl_0 = p_0 p_1, so the gradient is
    # (0.25 p_0 p_1, -0.25 p_0 p_1) = (0.0615330, -0.0615330).
    logits = torch.tensor([[-0.25, -0.5]], dtype=torch.float64, requires_grad=True)
    kld, probs = neg_entropy_and_probs(logits)
    kld.backward()
    assert kld.item() == pytest.approx(KLD, rel=1e-12)
    assert probs.tolist()[0] == pytest.approx([P0, 1 - P0], rel=1e-12)
    slope = 0.25 * P0 * (1 - P0)
    assert logits.grad.tolist()[0] == pytest.approx([slope, -slope], rel=1e-12)


def test_discrete_kl_gradient_by_finite_differences():
    # Rows of different sharpness, one with a code far behind (p ~ e^-30) and a batch scale.
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0], [5.0, -25.0, 4.0, 4.5], [0.0, 0.0, 0.0, 1e-3]],
                          dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: 3.0 * neg_entropy_and_probs(t)[0], (logits,))


def test_gaussian_deterministic_by_hand():
    out = gaussian_quantize(Z, VAR, BOOK, "deterministic", TAU)
    assert out["codes"].tolist() == [[[0]]]
    assert torch.equal(out["z_q"], latent(0.0, 0.0))
    assert out["kld_discrete"].item() == pytest.approx(-0.6853953, abs=1e-6)
    assert out["kld_continuous"].item() == pytest.approx(0.25, abs=1e-7)
    assert out["perplexity"].item() == pytest.approx(1 - 1e-7, abs=1e-6)
    assert out["entropy"].item() == pytest.approx(0.6853953, abs=1e-6)
    for value in out.values():
        if value is not None:
            assert value.dim() == 0 or value.shape[0] == 1


def test_gaussian_stochastic_perplexity_uses_soft_probabilities():
    out = gaussian_quantize(Z, VAR, BOOK, "stochastic", TAU)
    expected = math.exp(-(P0 * math.log(P0 + 1e-7) + (1 - P0) * math.log(1 - P0 + 1e-7)))
    assert expected == pytest.approx(1.984556, abs=1e-6)
    assert out["perplexity"].item() == pytest.approx(expected, rel=1e-6)
    assert out["kld_discrete"].item() == pytest.approx(KLD, abs=1e-6)
    # Whatever code was drawn, the continuous KL is the one of that code: 0.25 or 1/4 * 2 = 0.5.
    code = 0 if torch.equal(out["z_q"], latent(0.0, 0.0)) else 1
    assert torch.equal(out["z_q"], BOOK[code].reshape(1, 2, 1, 1))
    assert out["kld_continuous"].item() == pytest.approx((0.25, 0.5)[code], abs=1e-7)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_gaussian_train_mode_by_hand(tau):
    seed = 7
    torch.manual_seed(seed)
    out = gaussian_quantize(Z, VAR, BOOK, "train", torch.tensor(tau))
    g = gumbel_draw((1, 2), seed)[0]
    y = F.softmax((torch.tensor([-0.25, -0.5]) + g) / tau, dim=0)
    y1 = y[1].item()
    # z_hat = y_0 (0, 0) + y_1 (2, 1); continuous KL = 1/2 * 1/2 * ((1 - 2 y_1)^2 + y_1^2).
    torch.testing.assert_close(out["z_q"], latent(2 * y1, y1))
    expected = 0.25 * ((1 - 2 * y1) ** 2 + y1 ** 2)
    assert out["kld_continuous"].item() == pytest.approx(expected, rel=1e-5)
    assert out["kld_discrete"].item() == pytest.approx(KLD, abs=1e-6)  # no noise in the KL
    # Training perplexity is the one of the (detached) soft p, not of the relaxed y.
    assert out["perplexity"].item() == pytest.approx(math.exp(-KLD), rel=1e-5)


def test_gaussian_terms_are_per_image_means():
    # Three copies of the image: the sums over positions are divided by B = 3.
    z3 = Z.expand(3, 2, 1, 1).contiguous()
    out = gaussian_quantize(z3, VAR, BOOK, "deterministic", TAU)
    assert out["kld_discrete"].item() == pytest.approx(KLD, abs=1e-6)
    assert out["kld_continuous"].item() == pytest.approx(0.25, abs=1e-7)
    # Two positions in one image (a 1x2 latent) are summed, not averaged: twice the values.
    z12 = torch.cat([Z, Z], dim=3)
    out = gaussian_quantize(z12, VAR, BOOK, "deterministic", TAU)
    assert out["kld_discrete"].item() == pytest.approx(2 * KLD, abs=1e-6)
    assert out["kld_continuous"].item() == pytest.approx(0.5, abs=1e-7)


def test_gaussian_per_dimension_precision_by_hand():
    # Variant IV: sigma_q^2 = (1, 4) per dimension -> w = (1, 1/4).
    # l_0 = -1/2 (1 * 1^2 + 1/4 * 0^2) = -0.5 ; l_1 = -1/2 (1 * (-1)^2 + 1/4 * (-1)^2) = -0.625.
    # Code 0 wins; continuous KL = 1/2 (1 * 1^2 + 1/4 * 0^2) = 0.5.
    # p_0 = 1 / (1 + e^-0.125) = 0.5312094.
    var = latent(1.0, 4.0)
    out = gaussian_quantize(Z, var, BOOK, "deterministic", TAU)
    assert out["codes"].tolist() == [[[0]]]
    assert out["kld_continuous"].item() == pytest.approx(0.5, abs=1e-7)
    p0 = 1 / (1 + math.exp(-0.125))
    assert p0 == pytest.approx(0.5312094, abs=1e-7)
    expected = p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)
    assert out["kld_discrete"].item() == pytest.approx(expected, abs=1e-6)


def test_gaussian_precision_floor():
    # w = 1 / max(sigma^2, 1e-10): a zero variance gives w = 1e10, not inf/nan.
    # Deterministic code 0 is exact (z_hat = (0, 0)), so KL = 1/2 * 1e10 * 1 = 5e9.
    out = gaussian_quantize(Z, torch.tensor(0.0), BOOK, "deterministic", TAU)
    assert out["kld_continuous"].item() == pytest.approx(5e9, rel=1e-6)


# ---------------------------------------------------------------------------- vMF, by hand
#
# z = (3, 4) -> z/|z| = (0.6, 0.8); codes (0, 1) and (2, 1) -> (0, 1) and (2, 1)/sqrt 5;
# kappa_q = 2 (e^0 + 1).  Cosines: 0.8 and (1.2 + 0.8)/sqrt 5 = 2/sqrt 5 = 0.8944272.
# Logits (1.6, 4/sqrt 5 = 1.7888544); deterministic code 1, z_hat = (0.8944272, 0.4472136).
# Continuous KL = kappa z.(z - z_hat) = 2 (1 - 2/sqrt 5) = 0.2111456.
# p_1 = 1 / (1 + e^-(1.7888544 - 1.6)) = 1 / (1 + e^-0.1888544) = 0.5470738.

VZ = latent(3.0, 4.0)
VBOOK = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
KAPPA = torch.tensor(2.0)


def test_vmf_deterministic_by_hand():
    out = vmf_quantize(VZ, KAPPA, VBOOK, "deterministic", TAU)
    assert out["codes"].tolist() == [[[1]]]
    r5 = math.sqrt(5)
    torch.testing.assert_close(out["z_q"], latent(2 / r5, 1 / r5))
    assert out["kld_continuous"].item() == pytest.approx(0.2111456, abs=1e-6)
    p1 = 1 / (1 + math.exp(-(4 / r5 - 1.6)))
    assert p1 == pytest.approx(0.5470738, abs=1e-7)
    expected = p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)
    assert out["kld_discrete"].item() == pytest.approx(expected, abs=1e-6)


def test_vmf_train_mode_by_hand():
    seed = 3
    torch.manual_seed(seed)
    out = vmf_quantize(VZ, KAPPA, VBOOK, "train", torch.tensor(0.7))
    g = gumbel_draw((1, 2), seed)[0]
    r5 = math.sqrt(5)
    y = F.softmax((torch.tensor([1.6, 4 / r5]) + g) / 0.7, dim=0).tolist()
    # z_hat = y_0 (0, 1) + y_1 (2, 1)/sqrt 5; KL = 2 * ((0.6, 0.8) . ((0.6, 0.8) - z_hat)).
    zh = (y[1] * 2 / r5, y[0] + y[1] / r5)
    expected = 2 * (0.6 * (0.6 - zh[0]) + 0.8 * (0.8 - zh[1]))
    torch.testing.assert_close(out["z_q"], latent(*zh))
    assert out["kld_continuous"].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_vmf_ignores_input_and_code_lengths():
    scaled = vmf_quantize(VZ * 10, KAPPA, VBOOK * torch.tensor([[3.0], [0.5]]),
                          "deterministic", TAU)
    plain = vmf_quantize(VZ, KAPPA, VBOOK, "deterministic", TAU)
    for key in ("z_q", "kld_discrete", "kld_continuous"):
        torch.testing.assert_close(scaled[key], plain[key])


# ---------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("avg,expected", [
    ([0.5, 0.5], 2 * (1 - 2e-7)),  # exp(-ln(0.5 + 1e-7)) = 2 / (1 + 2e-7)
    ([0.25] * 4, 4 * (1 - 4e-7)),  # exp(-ln(0.25 + 1e-7)) = 4 / (1 + 4e-7)
    ([1.0, 0.0, 0.0], 1 - 1e-7),  # exp(-ln(1 + 1e-7))
    # Entropy 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2, so 2^1.5; the 1e-7 inside the logs
    # lowers it by a factor (1 - 3e-7).
    ([0.5, 0.25, 0.25], 2 ** 1.5 * (1 - 3e-7)),
])
def test_perplexity_by_hand(avg, expected):
    assert perplexity(torch.tensor(avg)).item() == pytest.approx(expected, abs=2e-6)


# ---------------------------------------------------------------------------- Gaussian likelihood
#
# B = 2 images of 1x2x2 (dim_x = 4), x = 0. Errors: image 1 (1, 0, 0, 0) -> 1,
# image 2 (1, 1, 1, 0) -> 3; mse = (1 + 3) / 2 = 2.
# ARELBO: dim_x / 2 * ln mse = 2 ln 2 = 1.3862944.
# Learned variance sigma^2 = 0.1: mse / (2 * 0.1) + 2 ln 0.1 = 10 - 4.6051702 = 5.3948298.

X0 = torch.zeros(2, 1, 2, 2)
XH = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]).reshape(2, 1, 2, 2)


def test_squared_error_by_hand():
    assert squared_error(XH, X0).item() == 2.0
    assert squared_error(XH + 0.5, X0 + 0.5).item() == 2.0
    # Differences of 3, not 0 or 1, where |d| and d^2 part: 4 * 3^2 over 2 images.
    assert squared_error(3 * XH, X0).item() == 18.0


def test_arelbo_by_hand():
    loss = arelbo_loss(squared_error(XH, X0), 4)
    assert loss.item() == pytest.approx(1.3862944, abs=1e-6)


def test_learned_variance_by_hand():
    loss = learned_variance_loss(squared_error(XH, X0), 4, torch.tensor(math.log(0.1)))
    assert loss.item() == pytest.approx(5.3948298, abs=1e-5)


@pytest.mark.parametrize("arelbo", [True, False])
def test_model_reconstruction_terms(arelbo):
    cfg, model = make_model("mnist_gauss_1", "flags.arelbo", str(arelbo))
    x, x_hat = make_input(cfg, 3, seed=1), make_input(cfg, 3, seed=2)
    terms = model.reconstruction_terms(x_hat, x)
    mse = ((x_hat.double() - x.double()) ** 2).sum().item() / 3
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    if arelbo:
        expected = 784 / 2 * math.log(mse)
    else:
        expected = mse / (2 * 0.1) + 784 / 2 * math.log(0.1)
    assert terms["loss_rec"].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- vMF likelihood

def vmf_reference(x_hat, labels, log_kappa_inv, dim_x):
    """docs/model.md §4 in numpy/scipy (float64)."""
    x_hat = x_hat.detach().double().numpy()
    labels = labels.numpy().reshape(x_hat.shape[0], *x_hat.shape[2:])
    n = x_hat.shape[1]
    unit = x_hat / np.linalg.norm(x_hat, axis=1, keepdims=True)
    cos = np.take_along_axis(unit, labels[:, None], axis=1)
    k_inv = math.exp(log_kappa_inv) + 1e-9
    m = n / 2
    log_c = -(m - 1) * math.log(k_inv) - 1 / k_inv - math.log(sp.ive(m - 1, 1 / k_inv))
    loss = -(1 / k_inv) * cos.sum(axis=(1, 2, 3)).mean() - dim_x * log_c
    acc = (x_hat.argmax(1) == labels).mean()
    return loss, acc


def test_vmf_reconstruction_by_hand():
    # One 2x2 label map (dim_x = 4), decoder output exactly one-hot at the true labels, so every
    # cosine c = 1 and accuracy = 1; kappa_inv = e^0 (+1e-9) = 1, m = 10.
    # Ie_9(1) = e^-1 I_9(1), I_9(1) = sum_k (1/2)^(2k+9) / (k! (k+9)!)
    #   = (1/2)^9 / 9! * (1 + 1/40 + 1/3520 + 1/506880 + ...) = 5.382288e-9 * 1.0252861
    #   = 5.518384e-9; ln I_9(1) = 1.708085 - 9 ln 10 = -19.015181, ln Ie_9(1) = -20.015181.
    # log C = -9 ln 1 - 1 + 20.015181 = 19.015181; L = -4 - 4 * 19.015181 = -80.060722.
    labels = torch.tensor([[[[0, 5], [18, 3]]]])
    x_hat = F.one_hot(labels[:, 0], 20).permute(0, 3, 1, 2).float()
    loss, acc = vmf_reconstruction(x_hat, labels, torch.tensor(0.0), 4)
    assert loss.item() == pytest.approx(-80.0607216, abs=1e-4)
    assert acc.item() == 1.0
    assert vmf_reference(x_hat, labels, 0.0, 4)[0] == pytest.approx(-80.0607216, abs=1e-6)


def test_vmf_accuracy_by_hand():
    # Decoder output peaks at the label on 3 of the 4 pixels -> accuracy 0.75.
    labels = torch.tensor([[[[1, 2], [3, 4]]]])
    wrong = torch.tensor([[[1, 2], [3, 9]]])
    x_hat = F.one_hot(wrong, 20).permute(0, 3, 1, 2).float() + 0.1
    _, acc = vmf_reconstruction(x_hat, labels, torch.tensor(0.0), 4)
    assert acc.item() == 0.75


@pytest.mark.parametrize("log_kappa_inv", [math.log(0.01), 0.0, math.log(10.0)])
def test_vmf_reconstruction_matches_scipy(log_kappa_inv):
    gen = torch.Generator().manual_seed(2)
    x_hat = F.softplus(torch.randn(2, 20, 2, 2, generator=gen))
    labels = torch.randint(0, 19, (2, 1, 2, 2), generator=gen)
    loss, acc = vmf_reconstruction(x_hat, labels, torch.tensor(log_kappa_inv), 4)
    ref_loss, ref_acc = vmf_reference(x_hat, labels, log_kappa_inv, 4)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-4)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-7)


def test_vmf_log_normalizer_matches_scipy():
    k_inv = torch.tensor([0.01, 0.3, 1.0, 20.0], dtype=torch.float64)
    got = vmf_log_normalizer(k_inv, 10)
    ref = [-9 * math.log(k) - 1 / k - math.log(sp.ive(9, 1 / k)) for k in k_inv.tolist()]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_vmf_reconstruction_gradients(layout):
    # Analytic gradients (through the Bessel normaliser and the label channel's own gather)
    # against finite differences, in both layouts (the gather's gradient keeps x_hat's).
    gen = torch.Generator().manual_seed(4)
    x_hat = (F.softplus(torch.randn(2, 20, 2, 3, generator=gen)).double() + 0.1)
    x_hat = x_hat.contiguous(memory_format=layout).requires_grad_(True)
    labels = torch.randint(0, 19, (2, 1, 2, 3), generator=gen)
    lk = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: vmf_reconstruction(a, labels, b, 4)[0],
                                    (x_hat, lk))


def test_vmf_model_reconstruction_terms():
    _, model = make_model("celebamask_vmf")
    gen = torch.Generator().manual_seed(1)
    x_hat = F.softplus(torch.randn(2, 20, 64, 64, generator=gen))
    labels = torch.randint(0, 19, (2, 1, 64, 64), generator=gen)
    terms = model.reconstruction_terms(x_hat, labels)
    ref_loss, ref_acc = vmf_reference(x_hat, labels, math.log(0.01), 4096)
    assert terms["loss_rec"].item() == pytest.approx(ref_loss, rel=1e-5)
    assert terms["acc"].item() == pytest.approx(ref_acc, abs=1e-6)


# ---------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("name", NAMES)
def test_total_loss_and_every_term_from_forward(name):
    """In eval mode, deterministic: every term recomputed from the encoder output by formula."""
    cfg, model = make_model(name)
    x = make_input(cfg, 2)
    model.eval()
    with torch.no_grad():
        x_hat, terms = model(x, "deterministic")
        z, log_var = model.encoder(x)
    torch.testing.assert_close(terms["loss"],
                               terms["loss_rec"] + terms["kld_discrete"] + terms["kld_continuous"])
    b, d = z.shape[:2]
    z, book = z.double(), model.codebook.detach().double()
    s = model.quantizer.log_param_q_scalar.detach().double()
    rows = z.permute(0, 2, 3, 1).reshape(b, -1, d)  # B x positions x D
    variant = cfg.model.param_var_q
    if variant == "vmf":
        kappa = math.exp(s.item()) + 1
        rows, book = F.normalize(rows, dim=-1), F.normalize(book, dim=-1)
        logits = kappa * rows @ book.t()
        param = torch.tensor(kappa)
    else:
        v = {"gaussian_1": lambda lv: torch.zeros(b, 1, 1, 1, dtype=torch.float64),
             "gaussian_2": lambda lv: lv.mean(dim=(1, 2, 3), keepdim=True),
             "gaussian_3": lambda lv: lv.mean(dim=1, keepdim=True),
             "gaussian_4": lambda lv: lv}[variant](
                 None if log_var is None else log_var.double())
        param = torch.exp(v) + torch.exp(s)
        w = (1 / param).expand(b, -1, *z.shape[2:]).permute(0, 2, 3, 1).reshape(b, -1,
                                                                                 param.shape[1])
        logits = -0.5 * (w[:, :, None, :] * (rows[:, :, None, :] - book) ** 2).sum(-1)
    p = F.softmax(logits, -1)
    codes = logits.argmax(-1)
    z_q = book[codes]  # B x positions x D
    kld_discrete = (p * F.log_softmax(logits, -1)).sum() / b
    if variant == "vmf":
        kld_continuous = (kappa * rows * (rows - z_q)).sum() / b
    else:
        kld_continuous = (0.5 * w * (rows - z_q) ** 2).sum() / b
    assert terms["kld_discrete"].item() == pytest.approx(kld_discrete.item(), rel=1e-4, abs=1e-3)
    assert terms["kld_continuous"].item() == pytest.approx(kld_continuous.item(), rel=1e-4,
                                                           abs=1e-4)
    assert terms["param_q"].item() == pytest.approx(param.mean().item(), rel=1e-5)
    a = F.one_hot(codes.reshape(-1), book.shape[0]).double().mean(0)
    expected_perplexity = torch.exp(-(a * torch.log(a + 1e-7)).sum())
    assert terms["perplexity"].item() == pytest.approx(expected_perplexity.item(), rel=1e-5)
    entropy = -(p * F.log_softmax(logits, -1)).sum(-1).mean()
    assert terms["entropy"].item() == pytest.approx(entropy.item(), rel=1e-4, abs=1e-4)
    if cfg.model.name == "VmfSQVAE":
        ref_loss, ref_acc = vmf_reference(x_hat, x, math.log(0.01), cfg.dataset.dim_x)
        assert terms["loss_rec"].item() == pytest.approx(ref_loss, rel=1e-5)
        assert terms["acc"].item() == pytest.approx(ref_acc, abs=1e-6)
    else:
        mse = ((x_hat.double() - x.double()) ** 2).sum().item() / b
        assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
        assert terms["loss_rec"].item() == pytest.approx(cfg.dataset.dim_x / 2 * math.log(mse),
                                                         rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_total_loss_is_the_sum_in_every_mode(name):
    cfg, model = make_model(name)
    x = make_input(cfg, 2)
    model.train()
    for mode in MODES:
        _, terms = model(x, mode)
        torch.testing.assert_close(
            terms["loss"], terms["loss_rec"] + terms["kld_discrete"] + terms["kld_continuous"])


@pytest.mark.parametrize("name", ["mnist_gauss_1", "celeba_gauss_2", "celeba_gauss_4",
                                  "celebamask_vmf", "cifar10_vmf"])
def test_discrete_kl_is_the_same_in_every_mode(name):
    cfg, model = make_model(name)
    x = make_input(cfg, 2)
    model.eval()
    model.quantizer.temperature.fill_(0.3)
    results = {}
    with torch.no_grad():
        for mode in MODES:
            torch.manual_seed(0)
            results[mode] = model(x, mode)[1]
    for mode in ("deterministic", "stochastic"):
        for key in ("kld_discrete", "entropy", "param_q"):
            assert torch.equal(results[mode][key], results["train"][key]), (mode, key)
    # Training perplexity and stochastic perplexity both use the soft p.
    torch.testing.assert_close(results["stochastic"]["perplexity"],
                               results["train"]["perplexity"])


# ---------------------------------------------------------------------------- quantizer variance

@pytest.mark.parametrize("variant", ["gaussian_1", "gaussian_2", "gaussian_3", "gaussian_4",
                                     "vmf"])
def test_quantizer_param(variant):
    cfg, model = make_model("mnist_gauss_1", "model.param_var_q", variant)
    with torch.no_grad():
        model.quantizer.log_param_q_scalar.fill_(0.3)
    log_var = torch.randn(2, 64, 7, 7, generator=torch.Generator().manual_seed(1))
    got = model.quantizer.param_q(log_var if variant in HEADS else None).detach()
    e_s = math.exp(0.3)
    if variant == "gaussian_1":
        expected = torch.tensor(1 + e_s)  # v = 0: one scalar
    elif variant == "gaussian_2":
        expected = torch.exp(log_var.mean(dim=(1, 2, 3))).reshape(2, 1, 1, 1) + e_s
    elif variant == "gaussian_3":
        expected = torch.exp(log_var.mean(dim=1)).reshape(2, 1, 7, 7) + e_s
    elif variant == "gaussian_4":
        expected = torch.exp(log_var) + e_s
    else:
        expected = torch.tensor(e_s + 1)  # kappa_q
    # Broadcastable to the latent exactly as docs/model.md §3 says: same values once expanded.
    torch.testing.assert_close(got.expand(2, 64, 7, 7), expected.expand(2, 64, 7, 7).float())
    assert got.dim() in (0, 4) and (got.dim() == 0) == (variant in ("gaussian_1", "vmf"))
    if got.dim() == 4:
        assert got.shape == expected.shape
