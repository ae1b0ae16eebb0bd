"""The quantizer layers (networks/quantizers.py) on tiny random tensors, outside our models.

Expected values are recomputed here in float64 from the formulas of docs/model.md §3 and
docs/vqvae.md, by broadcasting rather than the layers' matrix products.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from networks import GaussianQuantizer, VectorQuantizer, VmfQuantizer, arelbo
from tests.helpers import gumbel_draw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAUSSIAN = ["gaussian_1", "gaussian_2", "gaussian_3", "gaussian_4"]
KINDS = [*GAUSSIAN, "vmf", "vq"]
MODES = ["train", "deterministic", "stochastic"]
SPATIAL = [(5,), (2, 3), (2, 1, 3)]


def make(kind, dim=3, size=5, **kw):
    torch.manual_seed(0)
    if kind == "vmf":
        return VmfQuantizer(dim, size, **kw)
    if kind == "vq":
        return VectorQuantizer(dim, size, init="normal", **kw)
    return GaussianQuantizer(dim, size, kind, log_param_q_init=math.log(0.5), **kw)


def inputs(kind, shape, seed=1):
    """z (B x D x *spatial, channel-first) and, for Gaussian II-IV, a log-variance."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen) * 1.5
    log_var = torch.randn(shape, generator=gen) * 0.5 if kind in GAUSSIAN[1:] else None
    return z, log_var


def call(layer, z, log_var, **kw):
    return layer(z, **kw) if log_var is None else layer(z, log_var, **kw)


def rows(t):
    """channel-first -> positions x D, positions in (batch, *spatial) order."""
    return t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1])


def expected_logits(kind, layer, z, log_var):
    """(logits, codebook rows z_q is made of, precision per row or None, positions x D z),
    in float64."""
    book = layer.codebook.detach().double()
    zr = rows(z.double())
    s = layer.log_param_q_scalar.detach().double()
    if kind == "vmf":
        kappa = torch.exp(s) + 1
        zr, book = zr / zr.norm(dim=1, keepdim=True), book / book.norm(dim=1, keepdim=True)
        return kappa * (zr[:, None, :] * book[None]).sum(-1), book, kappa, zr
    lv = None if log_var is None else log_var.double()
    v = {"gaussian_1": lambda: torch.zeros(z.shape[0], 1, *[1] * (z.dim() - 2)),
         "gaussian_2": lambda: lv.mean(dim=tuple(range(1, z.dim())), keepdim=True),
         "gaussian_3": lambda: lv.mean(dim=1, keepdim=True),
         "gaussian_4": lambda: lv}[kind]().double()
    w = rows((1 / (torch.exp(v) + torch.exp(s))).expand(z.shape[0], v.shape[1], *z.shape[2:]))
    logits = -0.5 * (w[:, None, :] * (zr[:, None, :] - book[None]) ** 2).sum(-1)
    return logits, book, w, zr


# ----------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("training", [True, False])
def test_contract_shapes_and_aux(kind, spatial, training):
    layer = make(kind).train(training)
    z, log_var = inputs(kind, (2, 3, *spatial))
    z_q, aux = call(layer, z, log_var)
    assert z_q.shape == z.shape and z_q.dtype == torch.float32
    assert aux["loss"].dim() == 0 and aux["perplexity"].dim() == 0
    assert aux["codes"].shape == (2, *spatial) and aux["codes"].dtype == torch.int64
    extra = ({"loss_codebook", "loss_commit"} if kind == "vq" else
             {"kld_discrete", "kld_continuous", "entropy", "param_q", "param_q_min",
              "param_q_max"})
    assert set(aux) == {"loss", "codes", "perplexity"} | extra


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spatial", SPATIAL)
def test_eval_takes_the_best_code_and_its_loss(kind, spatial):
    layer = make(kind).eval()
    z, log_var = inputs(kind, (2, 3, *spatial))
    z_q, aux = call(layer, z, log_var)
    again = call(layer, z, log_var)[0]
    assert torch.equal(z_q, again)  # deterministic in eval mode
    b = z.shape[0]
    if kind == "vq":
        book, zr = layer.codebook.detach().double(), rows(z.double())
        codes = ((zr[:, None, :] - book[None]) ** 2).sum(-1).argmin(1)
        e = book[codes]
        # z + (e - z) is e up to rounding (straight-through).
        torch.testing.assert_close(rows(z_q).double(), e, rtol=0, atol=1e-6)
        torch.testing.assert_close(aux["loss_codebook"].double(), ((zr - e) ** 2).mean())
        torch.testing.assert_close(aux["loss_commit"].double(), 0.25 * ((zr - e) ** 2).mean())
        one_hot = F.one_hot(codes, 5).double()
    else:
        logits, book, w, zr = expected_logits(kind, layer, z, log_var)
        codes = logits.argmax(1)
        e = book[codes]
        torch.testing.assert_close(rows(z_q).double(), e, rtol=1e-6, atol=1e-7)
        assert torch.equal(z_q, layer.lookup(aux["codes"]))  # exactly the layer's rows
        p = logits.softmax(1)
        kld_discrete = (p * p.log()).sum() / b
        if kind == "vmf":
            kld_continuous = (w * zr * (zr - e)).sum() / b
        else:
            kld_continuous = (0.5 * w * (zr - e) ** 2).sum() / b
        torch.testing.assert_close(aux["kld_discrete"].double(), kld_discrete, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(aux["kld_continuous"].double(), kld_continuous, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(aux["loss"].double(), kld_discrete + kld_continuous,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux["entropy"].double(), -(p * p.log()).sum(1).mean(),
                                   rtol=1e-5, atol=1e-6)
        one_hot = F.one_hot(codes, 5).double()
    assert torch.equal(aux["codes"].reshape(-1), codes)
    a = one_hot.mean(0)
    torch.testing.assert_close(aux["perplexity"].double(),
                               torch.exp(-(a * (a + 1e-7).log()).sum()))
    torch.testing.assert_close(rows(layer.lookup(aux["codes"])).double(), e, rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("kind", ["gaussian_1", "gaussian_4", "vmf"])
def test_train_mode_is_the_gumbel_softmax_at_the_annealed_temperature(kind):
    layer = make(kind, temperature_init=2.0, temperature_decay=0.1, temperature_min=0.0)
    layer.anneal(10)  # 2 exp(-1)
    assert layer.temperature.item() == pytest.approx(0.7357588823428847, rel=1e-7)
    z, log_var = inputs(kind, (2, 3, 2, 2))
    torch.manual_seed(4)
    z_q, _ = call(layer, z, log_var)
    logits, book, _, _ = expected_logits(kind, layer, z, log_var)
    g = gumbel_draw(logits.shape, 4, torch.float64)
    y = ((logits + g) / (2 * math.exp(-1))).softmax(1)
    torch.testing.assert_close(rows(z_q).double(), y @ book, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step,expected", [(0, 1.5), (1, 1.5 * math.exp(-0.01)),
                                           (100, 1.5 * math.exp(-1.0)), (1000, 0.25)])
@pytest.mark.parametrize("kind", ["gaussian_1", "vmf"])
def test_anneal_follows_the_schedule(kind, step, expected):
    layer = make(kind, temperature_init=1.5, temperature_decay=0.01, temperature_min=0.25)
    assert layer.temperature_at(step) == expected
    assert layer.anneal(step) == expected
    assert layer.temperature.item() == torch.tensor(expected, dtype=torch.float32).item()


def test_the_nearest_code_layer_has_no_temperature():
    # Every mode of VectorQuantizer takes the nearest code: nothing to anneal or log.
    layer = make("vq")
    assert not any(hasattr(layer, name) for name in ("temperature", "anneal", "schedule"))
    with pytest.raises(TypeError, match="temperature_init"):
        VectorQuantizer(8, 16, temperature_init=1.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("mode", MODES)
def test_channel_first_and_channel_last_are_identical(kind, spatial, mode):
    first, last = make(kind), make(kind, channel_last=True)
    z, log_var = inputs(kind, (2, 3, *spatial))
    z_first = z.clone().requires_grad_(True)
    z_last = z.movedim(1, -1).contiguous().requires_grad_(True)
    lv_last = None if log_var is None else log_var.movedim(1, -1).contiguous()
    torch.manual_seed(5)
    q_first, aux_first = call(first, z_first, log_var, mode=mode)
    torch.manual_seed(5)
    q_last, aux_last = call(last, z_last, lv_last, mode=mode)
    assert q_last.shape == z_last.shape
    assert torch.equal(q_last.movedim(-1, 1), q_first)
    assert aux_first.keys() == aux_last.keys()
    assert all(torch.equal(aux_first[k], aux_last[k]) for k in aux_first)
    weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(6))
    ((q_first * weights).sum() + aux_first["loss"]).backward()
    ((q_last * weights.movedim(1, -1)).sum() + aux_last["loss"]).backward()
    assert torch.equal(z_last.grad.movedim(-1, 1), z_first.grad)
    assert torch.equal(first.codebook.grad, last.codebook.grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_first_z_q_keeps_the_layout_of_z(kind, mode, layout):
    # Built position by position, z_q is a channels-last view. Handed to an NCHW model so,
    # the decoder's weight gradients would come back with strides DDP warns about every
    # step; handed to a channels-last model as NCHW, every decoder convolution would pay a
    # layout conversion (the slowdown of issue 31).
    layer = make(kind)
    z, log_var = inputs(kind, (2, 3, 4, 5))
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
        log_var = None if log_var is None else log_var.contiguous(
            memory_format=torch.channels_last)
    z_q = call(layer, z, log_var, mode=mode)[0]
    assert z_q.is_contiguous() == (layout == "nchw")
    assert z_q.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert layer.lookup(torch.tensor([[[0, 1, 2, 3, 4]] * 4] * 2)).is_contiguous()


@pytest.mark.parametrize("make_layer,message", [
    (lambda: GaussianQuantizer(3, 5, "gaussian_9"), "unknown variance"),
    (lambda: GaussianQuantizer(3, 5, "gaussian_2")(torch.zeros(1, 3, 2)), "log-variance"),
    (lambda: GaussianQuantizer(3, 5)(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)),
     "no log-variance"),
    (lambda: GaussianQuantizer(3, 5)(torch.zeros(1, 4, 2)), "dim=3"),
    (lambda: VmfQuantizer(3, 5, channel_last=True)(torch.zeros(1, 3, 2)), "dim=3"),
    (lambda: VectorQuantizer(3, 5)(torch.zeros(1, 3, 2), mode="soft"), "unknown mode"),
])
def test_misuse_is_a_one_line_value_error(make_layer, message):
    with pytest.raises(ValueError, match=message) as e:
        make_layer()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- in a model not ours

def clustered_tokens(gen, clusters=4, n=64, length=4, width=16):
    """Tokens near one of a few fixed centres in R^width, channel-last (n x length x width)."""
    centers = torch.randn(clusters, width, generator=torch.Generator().manual_seed(0))
    pick = torch.randint(0, clusters, (n, length), generator=gen)
    return centers[pick] + 0.05 * torch.randn(n, length, width, generator=gen)


def train_token_autoencoder(make_layer, objective, steps=200, seed=0):
    """A linear encoder and decoder around a layer (channel-last, dim 8) on clustered tokens;
    returns the per-step aux and the deterministic test error before and after."""
    torch.manual_seed(seed)
    layer = make_layer()
    heads = 2 if getattr(layer, "needs_log_var", False) else 1
    encoder, decoder = nn.Linear(16, 8 * heads), nn.Linear(8, 16)
    params = [p for m in (encoder, decoder, layer) for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    test = clustered_tokens(torch.Generator().manual_seed(2), n=256)

    def quantize(x, **kw):
        return layer(*encoder(x).chunk(heads, dim=-1), **kw)

    def test_error():
        with torch.no_grad():
            return F.mse_loss(decoder(quantize(test, mode="deterministic")[0]), test).item()

    before, history, gen = test_error(), [], torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        if hasattr(layer, "anneal"):  # the stochastic layers
            layer.anneal(step)
        x = clustered_tokens(gen)
        z_q, aux = quantize(x)
        loss = objective(decoder(z_q), x) + aux["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: v.detach() for k, v in aux.items()})
    return history, before, test_error()


@pytest.mark.parametrize("layer,objective", [
    (lambda: GaussianQuantizer(8, 16, channel_last=True), arelbo),
    (lambda: GaussianQuantizer(8, 16, "gaussian_3", channel_last=True), arelbo),
    # kappa_q starts at 1.05, nearly uniform, and rises ~lr a step in log space: start at 2.
    (lambda: VmfQuantizer(8, 16, log_param_q_init=0.0, channel_last=True), arelbo),
    (lambda: VectorQuantizer(8, 16, channel_last=True), F.mse_loss),
    (lambda: VectorQuantizer(8, 16, ema=True, channel_last=True), F.mse_loss),
], ids=["gaussian_1", "gaussian_3", "vmf", "vq", "vq_ema"])
def test_each_layer_learns_in_a_token_autoencoder(layer, objective):
    _, before, after = train_token_autoencoder(layer, objective)
    assert after < before / 4, (before, after)


def mean_of(history, key, steps):
    return torch.stack([h[key] for h in history[steps]]).mean().item()


def test_arelbo_anneals_variant_i_by_itself_and_a_plain_mse_does_not():
    first, last = slice(0, 20), slice(-20, None)
    layer = lambda: GaussianQuantizer(8, 16, channel_last=True)  # noqa: E731
    history, _, _ = train_token_autoencoder(layer, arelbo)
    # Self-annealing: the code entropy and sigma_q^2 fall while tau stays near 1.
    assert mean_of(history, "entropy", last) < 0.3 * mean_of(history, "entropy", first)
    assert mean_of(history, "param_q", last) < 0.5 * mean_of(history, "param_q", first)
    # With F.mse_loss the KL outweighs the data: sigma_q^2 grows, the codes stay uniform.
    history, _, _ = train_token_autoencoder(layer, F.mse_loss)
    assert mean_of(history, "entropy", last) > 0.995 * math.log(16)
    assert mean_of(history, "param_q", last) > mean_of(history, "param_q", first)


# ----------------------------------------------------------------------------- devices, precision

class OpLog(TorchDispatchMode):
    """Every aten op run inside, with the devices and dtypes of what it made and was given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in tree_flatten(tree)[0]  # noqa: E731
                                if isinstance(t, torch.Tensor)]
        self.calls.append((str(func.overloadpacket), tensors((args, kwargs)), tensors(out)))
        return out


def training_step(layer, z, log_var, step=3):
    if hasattr(layer, "anneal"):  # the stochastic layers
        layer.anneal(step)
    z_q, aux = call(layer, z, log_var)
    ((z_q ** 2).sum() + aux["loss"]).backward()
    return z_q, aux


@pytest.mark.parametrize("kind", [*KINDS, "vq_ema"])
def test_on_the_meta_device_nothing_is_made_elsewhere(kind):
    with OpLog() as log:
        with torch.device("meta"):
            layer = make(kind.removesuffix("_ema"), **({"ema": True} if kind == "vq_ema" else {}))
            z = torch.randn(2, 3, 2, 2, requires_grad=True)
            log_var = torch.randn(2, 3, 2, 2) if kind in GAUSSIAN[1:] else None
        for mode in MODES:
            call(layer.eval(), z, log_var, mode=mode)
        z_q, aux = training_step(layer.train(), z, log_var)
    made = {t.device.type for _, _, outs in log.calls for t in outs}
    assert made == {"meta"}
    assert z.grad.device.type == "meta"
    assert all(t.device.type == "meta" for t in layer.buffers())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_quantizes_in_float32(kind, mode):
    layer = make(kind)
    z, log_var = inputs(kind, (2, 3, 2, 2))
    z, log_var = z.bfloat16(), None if log_var is None else log_var.bfloat16()
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16), OpLog() as log:
        z_q, aux = call(layer, z, log_var, mode=mode)
    torch.manual_seed(7)
    want_q, want = call(layer, z.float(), None if log_var is None else log_var.float(),
                        mode=mode)
    products = [args for name, args, _ in log.calls if name in ("aten.mm", "aten.addmm")]
    assert products and all(t.dtype == torch.float32 for args in products for t in args)
    assert z_q.dtype == torch.float32 and torch.equal(z_q, want_q)
    assert all(torch.equal(aux[k], want[k]) for k in want)


# Ops that read a tensor's value back to the host (or need it for an output's shape).
HOST_READS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal",
              "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
              "aten.unique_consecutive", "aten.repeat_interleave"}


@pytest.mark.parametrize("kind", [*KINDS, "vq_ema"])
def test_a_training_step_never_reads_back_to_the_host(kind):
    layer = make(kind.removesuffix("_ema"), **({"ema": True} if kind == "vq_ema" else {}))
    z, log_var = inputs(kind, (2, 3, 2, 2))
    z.requires_grad_(True)
    with OpLog() as log:
        training_step(layer.train(), z, log_var)
    names = {name for name, _, _ in log.calls}
    assert "aten.mm" in names and names & HOST_READS == set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sync debug mode)")
@pytest.mark.parametrize("kind", [*KINDS, "vq_ema"])
def test_a_training_step_never_synchronises_on_cuda(kind):
    with torch.device("cuda"):
        layer = make(kind.removesuffix("_ema"), **({"ema": True} if kind == "vq_ema" else {}))
        z = torch.randn(2, 3, 2, 2, requires_grad=True)
        log_var = torch.randn(2, 3, 2, 2) if kind in GAUSSIAN[1:] else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(layer.train(), z, log_var)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- lifting them out

def test_the_layers_import_without_the_config_system():
    code = ("import sys\n"
            "for blocked in ('yacs', 'configs'):\n"
            "    sys.modules[blocked] = None\n"
            "from networks import GaussianQuantizer, VmfQuantizer, VectorQuantizer, arelbo\n"
            # util is a leaf (util.device picks the vMF precision); the config system,
            # the data and the trainer must stay out.
            "ours = ('yacs', 'configs', 'data', 'trainer')\n"
            "print(sorted(m for m, module in sys.modules.items()\n"
            "             if module is not None and m.split('.')[0] in ours))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_docs_example_runs_and_gives_each_cluster_its_code():
    with open(os.path.join(REPO, "docs", "layers.md")) as f:
        (example,) = re.findall(r"## Example.*?```python\n(.*?)```", f.read(), re.S)
    scope = {}
    exec(compile(example, "docs/layers.md", "exec"), scope)
    quantizer, encoder, decoder = scope["quantizer"], scope["encoder"], scope["decoder"]
    centers, codes = scope["centers"], scope["aux"]["codes"]
    assert codes.shape == (4,) and codes.unique().numel() == 4
    with torch.no_grad():
        decoded = decoder(quantizer.lookup(codes))
        untrained_error = ((centers - centers.mean(0)) ** 2).mean()
    assert torch.equal(decoded, decoder(scope["z_q"]))
    assert scope["error"].item() == pytest.approx(F.mse_loss(decoded, centers).item())
    assert scope["error"] < untrained_error / 100
    assert not quantizer.training and encoder.weight.grad is not None


# ----------------------------------------------------------------------------- what layers.md warns

@pytest.mark.parametrize("variance", ["gaussian_2", "gaussian_3", "gaussian_4"])
def test_variants_2_to_4_take_a_log_var_of_z_full_shape_only(variance):
    # docs/layers.md: whatever the variant averages it to, log_var comes at z's shape.
    layer = GaussianQuantizer(4, 8, variance)
    z = torch.randn(2, 4, 3, 3)
    layer(z, torch.zeros_like(z))
    for shape in ((2, 1, 1, 1), (2, 1, 3, 3)):
        with pytest.raises(ValueError, match="log_var has shape"):
            layer(z, torch.zeros(shape))


@pytest.mark.parametrize("layer", [lambda: GaussianQuantizer(8, 16, channel_last=True),
                                   lambda: VmfQuantizer(8, 16, channel_last=True)])
def test_the_sq_loss_is_negative_at_the_start(layer):
    # docs/layers.md: kld_discrete is minus an entropy, about -positions * log K while the
    # codes are near uniform, and it outweighs kld_continuous at the start.
    torch.manual_seed(0)
    _, aux = layer()(torch.randn(64, 4, 8))
    assert aux["kld_discrete"] < 0 and aux["loss"] < 0
    assert aux["kld_discrete"] >= -4 * math.log(16) - 1e-4
