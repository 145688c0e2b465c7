"""PTQ4ViT's Hessian-guided range search and HAWQ's Hessian-trace sensitivity, against what they promise."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leanvit.compress.quant import QuantConfig, QuantLinear, allocate_bits, layer_sensitivity, quantize
from leanvit.compress.quant.calibrate import quantizers_disabled
from leanvit.compress.quant.mixed import hessian_traces
from leanvit.errors import LeanvitError

torch.set_num_threads(1)


class ClsTokens(nn.Module):
    """Pixels as tokens; the first token is 20x larger than the rest and alone reaches the head, so
    the loss cares about a rare outlier row that a plain MSE range clips."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        t = torch.cat([t[:, :1] * 20, t[:, 1:]], 1)
        return self.head(self.fc(t)[:, 0])


def grad_weighted_error(qmodel, layer, images):
    """``sum(g^2 (O_hat - O)^2)`` of ``layer`` over all positions, ``g`` the pseudo-label loss gradient."""
    found = {}

    def hook(_, args, out):
        found["x"], found["out"] = args[0], out
        out.retain_grad()

    handle = layer.register_forward_hook(hook)
    with torch.enable_grad(), quantizers_disabled(qmodel):
        logits = qmodel(images)
        F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
    handle.remove()
    with torch.no_grad():
        err = layer(found["x"]) - found["out"]
    return float((found["out"].grad.pow(2) * err.pow(2)).sum()), float(err.pow(2).mean())


def test_hessian_search_lowers_the_gradient_weighted_output_error():
    torch.manual_seed(0)
    model = ClsTokens().eval()
    calib = torch.randn(32, 16, 16, 16)
    mse = quantize(model, calib, QuantConfig(w_bits=4, a_bits=4), progress=False)
    hessian = quantize(model, calib, QuantConfig(w_bits=4, a_bits=4, hessian_search=True), progress=False)
    (weighted_mse, plain_mse), (weighted_h, plain_h) = (grad_weighted_error(q, q.fc, calib) for q in (mse, hessian))
    assert weighted_h < 0.2 * weighted_mse
    assert plain_h > plain_mse  # a different objective: the plain output MSE is what it gives up
    assert hessian.fc.input_quantizer.scale > 2 * mse.fc.input_quantizer.scale  # the class token is no longer clipped


def test_hessian_search_needs_logits_and_per_tensor_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)).eval()
    with pytest.raises(LeanvitError, match=r"\(batch, classes\) logits"):
        quantize(model, torch.randn(16, 3, 8, 8), QuantConfig(hessian_search=True), progress=False)
    with pytest.raises(LeanvitError, match="a_per_channel"):
        QuantConfig(hessian_search=True, a_per_channel=True)


def test_hutchinson_trace_matches_the_exact_hessian_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    images = torch.randn(8, 5)
    weights = {"0": model[0].weight, "2": model[2].weight}
    estimate = hessian_traces(model, images, weights, samples=2000)
    for name, weight in weights.items():
        def loss(w, name=name):
            logits = torch.func.functional_call(model, {f"{name}.weight": w}, (images,))
            return F.cross_entropy(logits, model(images).argmax(1).detach())
        exact = torch.autograd.functional.hessian(loss, weight.detach()).reshape(weight.numel(), -1).trace()
        assert estimate[name] == pytest.approx(float(exact) / weight.numel(), rel=0.1)


class FourLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(3)])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


@pytest.fixture(scope="module")
def fragile():
    """``layers.1`` has one weight 30x the others per row: at 4 bits its per-channel scale rounds the rest to 0."""
    torch.manual_seed(0)
    model = FourLayers().eval()
    with torch.no_grad():
        weight = model.layers[1].weight
        weight[torch.arange(32), torch.randint(0, 32, (32,))] *= 30
    return model, torch.randn(32, 2, 4, 4)


def test_hessian_sensitivity_ranks_the_fragile_layer_first(fragile):
    model, calib = fragile
    config = QuantConfig(w_bits=4, a_bits=8)
    hessian = layer_sensitivity(model, calib, config, method="hessian")
    logit = layer_sensitivity(model, calib, config)
    assert set(hessian) == set(logit) == {"layers.0", "layers.1", "layers.2", "head"}
    assert max(hessian, key=hessian.get) == max(logit, key=logit.get) == "layers.1"
    bits = allocate_bits(model, calib, 7.0, low="w4a8", high="w8a8", method="hessian")
    assert ("layers.1", "w4a8") not in bits and bits[-1] == ("*", "w8a8") and len(bits) > 1
    with pytest.raises(LeanvitError, match="sensitivity method 'fisher'"):
        layer_sensitivity(model, calib, config, method="fisher")


def test_hessian_search_keeps_per_channel_depthwise_inputs():
    """Q-HyViT's granularity choice with the Hessian search: a per-channel input range stays, the weights are searched."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.GELU(), nn.Conv2d(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.logspace(-2, 1, 8))
    calib = torch.randn(32, 3, 12, 12)
    config = QuantConfig(w_bits=4, a_bits=4, quantize_depthwise=True, a_per_channel="auto")
    plain = quantize(model, calib, config, progress=False)
    searched = quantize(model, calib, QuantConfig(**{**vars(config), "hessian_search": True}), progress=False)
    assert searched[3].input_quantizer.scheme.per_channel
    assert torch.equal(searched[3].input_quantizer.scale, plain[3].input_quantizer.scale)
    assert not torch.equal(searched[3].weight_quantizer.scale, plain[3].weight_quantizer.scale)


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 3, groups=2), nn.Linear(4, 3)])
def test_per_channel_input_rows_are_quantized_as_the_layer_quantizes_its_input(layer):
    from leanvit.compress.quant.hessian import _input_rows, _quantized_rows
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme

    torch.manual_seed(2)
    x = torch.randn(2, 4, 5, 5) * torch.logspace(-1, 1, 4).view(1, 4, 1, 1)
    if isinstance(layer, nn.Linear):
        x = x.movedim(1, -1)
    axis = -1 if isinstance(layer, nn.Linear) else 1
    quantizer = FakeQuantizer(QScheme(4, symmetric=False, per_channel=True), axis=axis, channels=4)
    quantizer.set_range(torch.linspace(-1, -0.1, 4), torch.linspace(0.5, 9, 4))
    expected = _input_rows(layer, quantizer(x))
    assert torch.allclose(_quantized_rows(_input_rows(layer, x), quantizer), expected, atol=1e-6)


def test_a_range_no_candidate_beats_keeps_its_scale_and_zero_point(monkeypatch):
    """Where the search keeps the starting ratio, the calibrated ranges stay bit for bit, though the sampled inputs
    span less than the calibration data did (their min-max used to set the zero point)."""
    import leanvit.compress.quant.hessian as hessian
    from leanvit.compress.quant.quantizer import QScheme

    layer = QuantLinear.from_float(nn.Linear(6, 4), QScheme(4, True, True), QScheme(4, symmetric=False))
    layer.weight_quantizer.set_range(-layer.weight.detach().abs().amax(1), layer.weight.detach().abs().amax(1))
    layer.input_quantizer.set_range(torch.tensor(-3.0), torch.tensor(5.0))
    quantizers = (layer.weight_quantizer, layer.input_quantizer)
    before = [t.clone() for q in quantizers for t in q.state_dict().values()]
    x = torch.rand(32, 1, 6) * 2 - 0.5  # sampled rows (N, groups, K): [-0.5, 1.5], another zero point than [-3, 5] has
    monkeypatch.setattr(hessian, "_ratio_search", lambda error, start: start)
    monkeypatch.setattr(hessian, "_input_range_search", lambda error, current, families: current)
    hessian._search_layer(layer, x, torch.ones(32, 4), rounds=2, search_input=True)
    after = [t for q in quantizers for t in q.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    monkeypatch.undo()  # and where candidates win, the range moves to the sampled inputs
    hessian._search_layer(layer, x, torch.ones(32, 4), rounds=2, search_input=True)
    assert layer.input_quantizer.scale < before[-2]


def test_the_input_range_search_keeps_the_current_range_unless_a_family_beats_it():
    from leanvit.compress.quant.hessian import _input_range_families, _input_range_search

    x = torch.rand(64) * 2 - 0.5  # [-0.5, 1.5]
    current = (torch.tensor([-3.0]), torch.tensor([5.0]))
    families = _input_range_families(x, *current)
    (lo, hi, start), sampled = families
    assert torch.allclose(lo * start, current[0]) and torch.allclose(hi * start, current[1])  # ratio 1/widen: itself
    assert torch.equal(sampled[0], x.min().reshape(1)) and torch.equal(sampled[1], x.max().reshape(1))
    assert _input_range_search(lambda lo, hi: torch.zeros_like(lo), current, families) is current  # nothing beats it
    wide = _input_range_search(lambda lo, hi: (hi - lo - 1.0).abs(), current, families)
    assert float(wide[1] - wide[0]) == pytest.approx(1.0, abs=0.2)  # a better range is found and returned


@pytest.mark.parametrize("images", [16, 256])
def test_fewer_calibration_images_than_asked_still_give_the_rows_asked(images, monkeypatch):
    """With 16 images and ``images=256`` each batch's share of the rows is of the 16 it has, not of 256."""
    from leanvit.compress.quant import hessian

    torch.manual_seed(0)
    model = ClsTokens().eval()
    calib = torch.randn(16, 16, 16, 16)
    qmodel = quantize(model, calib, QuantConfig(w_bits=4, a_bits=4, batch_size=8), progress=False)
    layers = {"fc": qmodel.fc, "head": qmodel.head}
    draws, draw_rows = [], hessian._draw_rows
    monkeypatch.setattr(hessian, "_draw_rows", lambda g, keep, gen: draws.append(keep) or draw_rows(g, keep, gen))
    samples = hessian._collect(qmodel, layers, list(calib.split(8)), images, 64, torch.Generator().manual_seed(0))
    assert set(samples) == {"fc", "head"} and draws == [32, 32] * 2  # two layers, two batches of 8 images each


def test_a_row_drawn_several_times_is_one_row_with_its_weights_summed():
    """Where the gradient reaches few rows most draws repeat them: each is kept once, so its error is computed once,
    its weight that of one draw times the times it was drawn (the same estimate of the gradient-weighted sum)."""
    from leanvit.compress.quant.hessian import _draw_rows

    grad_sq = torch.zeros(100, 3)
    grad_sq[[7, 42]] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 0.5]])
    index, weighted = _draw_rows(grad_sq, 64, torch.Generator().manual_seed(0))
    assert index.tolist() == [7, 42]
    p = grad_sq.sum(1) / grad_sq.sum()
    draws = weighted / (grad_sq[index] / (64 * p[index])[:, None])  # per row: how many of the 64 draws it took
    torch.testing.assert_close(draws, draws[:, :1].round().expand(-1, 3))
    assert draws[:, 0].round().sum() == 64 and (draws[:, 0] > 1).all()


class Mixing(nn.Module):
    """One attention written with plain products (quantized as :class:`QuantMatrixProducts`) whose first query is
    20x larger than the rest. Keeps its first product's float operands and output (``seen``) so a test can weigh
    their errors by the gradient."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.seen = ()

    def forward(self, t):
        q, k = self.qk(t).chunk(2, -1)
        q = torch.cat([q[:, :1] * 20, q[:, 1:]], 1)
        attn = q @ k.transpose(-2, -1)
        if attn.requires_grad:
            attn.retain_grad()
            self.seen = [(q, k.transpose(-2, -1), attn)]
        return attn.softmax(-1) @ t


class ClsAttention(nn.Module):
    """Pixels as tokens, mixed; only the first token reaches the head, so the loss reads one row of the product."""

    def __init__(self):
        super().__init__()
        self.mix = Mixing()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.mix(x.flatten(2).transpose(1, 2))[:, 0])


def product_errors(qmodel, calib):
    """``sum(g^2 (Q(a) Q(b) - a b)^2)`` of each product ``qmodel.mix`` keeps (``seen``), ``g`` the pseudo-label loss
    gradient at its output."""
    with torch.enable_grad(), quantizers_disabled(qmodel):
        logits = qmodel(calib)
        F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
    errors = []
    for i, (a, b, out) in enumerate(qmodel.mix.seen):
        a_quantizer, b_quantizer = (getattr(qmodel.mix, f"matmul{i}_{side}_quantizer") for side in "ab")
        with torch.no_grad():
            errors.append(float((out.grad.pow(2) * (a_quantizer.quantize(a) @ b_quantizer.quantize(b) - a @ b).pow(2)
                                 ).sum()))
    return errors


QUANTIZERS = ("matmul0_a_quantizer", "matmul0_b_quantizer", "matmul1_a_quantizer", "matmul1_b_quantizer")


def test_hessian_search_lowers_the_gradient_weighted_error_of_attention_products():
    """PTQ4ViT searches the attention matmuls' input ranges too. The calibrated (MSE) ranges serve every row of
    ``q @ kT`` alike; the loss reads only the first, and the searched ranges cut the product's gradient-weighted
    error 10x. Every operand keeps its scheme and zero point (an unsigned one stays on a grid from 0)."""
    from leanvit.compress.quant.hessian import hessian_search

    torch.manual_seed(0)
    model = ClsAttention().eval()
    calib = torch.randn(32, 8, 4, 4)
    config = QuantConfig(w_bits=8, a_bits=8, attn_bits=4, min_images=16)
    layers_only, both = (quantize(model, calib, config, progress=False) for _ in range(2))
    assert type(both.mix).__name__.startswith("QuantMatmul")
    hessian_search(layers_only, [calib], products=False, progress=False)
    searched = hessian_search(both, [calib], rows=4096, progress=False)
    assert {f"mix.{name}" for name in QUANTIZERS} <= set(searched)
    assert product_errors(both, calib)[0] < 0.3 * product_errors(layers_only, calib)[0]  # (0.24 against 2.59)
    for name in QUANTIZERS:
        before, after = getattr(layers_only.mix, name), getattr(both.mix, name)
        assert after.scheme == before.scheme and torch.equal(after.zero_point, before.zero_point)


@pytest.mark.parametrize("softmax", ["uniform", "log2"])
def test_hessian_search_finds_every_product_of_timm_attention(softmax):
    """All four matmul operands of a timm ViT's attention are searched; a log2 softmax quantizer keeps its fit."""
    from timm.models.vision_transformer import VisionTransformer

    from leanvit.compress.quant.hessian import hessian_search

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10).eval()
    calib = torch.randn(16, 3, 16, 16)
    qmodel = quantize(model, calib, QuantConfig(w_bits=8, a_bits=8, attn_bits=4, softmax_quantizer=softmax),
                      progress=False)
    before = {n: t.clone() for n, t in qmodel.state_dict().items() if "softmax_quantizer" in n}
    searched = set(hessian_search(qmodel, [calib], progress=False))
    operands = ["q_quantizer", "k_quantizer", "v_quantizer"] + (["softmax_quantizer"] if softmax == "uniform" else [])
    expected = {f"blocks.{i}.attn.{operand}" for i in range(2) for operand in operands}
    assert {n for n in searched if n.endswith("_quantizer")} == expected
    if softmax == "log2":
        assert all(torch.equal(t, qmodel.state_dict()[n]) for n, t in before.items())


def test_a_product_of_a_tensor_with_itself_keeps_its_ranges():
    """``x @ x``: both quantizers return the one tensor while disabled, so which operand a tag names is unknown;
    the search used to pair the second quantizer with itself and make the product's error 28 % worse."""
    from leanvit.compress.quant.hessian import hessian_search

    class Square(nn.Module):
        def forward(self, t):
            return t @ t

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.mix, self.head = nn.Linear(8, 8), Square(), nn.Linear(8, 10)

        def forward(self, x):
            return self.head(self.mix(self.proj(x.flatten(2)))[:, 0])

    torch.manual_seed(0)
    calib = torch.randn(16, 8, 2, 4)
    qmodel = quantize(Model().eval(), calib, QuantConfig(attn_bits=4, min_images=16), progress=False)
    before = {n: t.clone() for n, t in qmodel.mix.state_dict().items()}
    searched = hessian_search(qmodel, [calib], progress=False)
    assert not [n for n in searched if n.startswith("mix.")]
    assert all(torch.equal(t, qmodel.mix.state_dict()[n]) for n, t in before.items())


class SharedQuery(nn.Module):
    """Two products of one query, ``q @ k1ᵀ`` and ``q @ k2ᵀ``, its first row 20x larger than the rest; keeps their
    float operands and outputs (``seen``)."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 24)
        self.seen = ()

    def forward(self, t):
        q, k1, k2 = self.qk(t).chunk(3, -1)
        q = torch.cat([q[:, :1] * 20, q[:, 1:]], 1)
        products = [(q, k.transpose(-2, -1), q @ k.transpose(-2, -1)) for k in (k1, k2)]
        if q.requires_grad:
            for *_, out in products:
                out.retain_grad()
            self.seen = products
        return [out for *_, out in products]


class TwoProducts(nn.Module):
    """The loss reads the first product's rows but the outlier's, and of the second only the outlier's row."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = SharedQuery(), nn.Linear(16, 10)

    def forward(self, x):
        first, second = self.mix(x.flatten(2).transpose(1, 2))
        return self.head(second[:, 0] + first[:, 1:].mean(1))


def test_a_quantizer_two_products_read_is_searched_on_both_errors():
    """One quantizer for the query both products read (quantized once for the two): its range is searched on the sum
    of their gradient-weighted errors. Searched on the first product alone, as it was, its range clipped the outlier
    row the second product's error hangs on: the summed error rose to 29x the calibrated ranges' (now 0.59x)."""
    from leanvit.compress.quant.hessian import hessian_search

    torch.manual_seed(0)
    calib = torch.randn(32, 8, 4, 4)
    qmodel = quantize(TwoProducts().eval(), calib, QuantConfig(w_bits=8, a_bits=8, attn_bits=4, min_images=16),
                      progress=False)
    qmodel.mix.matmul1_a_quantizer = qmodel.mix.matmul0_a_quantizer
    before = product_errors(qmodel, calib)
    searched = hessian_search(qmodel, [calib], rows=4096, progress=False)
    assert {"mix.matmul1_a_quantizer", "mix.matmul0_b_quantizer", "mix.matmul1_b_quantizer"} <= set(searched)
    after = product_errors(qmodel, calib)
    assert sum(after) < 0.8 * sum(before), (before, after)


@pytest.mark.parametrize("symmetric", [True, False])
def test_candidate_ranges_quantize_as_fake_quantize_does_bit_for_bit(symmetric):
    """The product search quantizes an operand for a batch of candidate ranges at once, in whole-tensor operations;
    each candidate's values are :func:`fake_quantize`'s, ties to even (exact halves of a 0.25 step) included."""
    from leanvit.compress.quant.hessian import _per_tensor
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme, fake_quantize, qparams

    torch.manual_seed(0)
    quantizer = FakeQuantizer(QScheme(4, symmetric=symmetric), axis=-1, channels=1)
    lo, hi = -torch.rand(8) * 3, torch.rand(8) * 3 + 0.1
    lo[0], hi[0] = (-1.75, 1.75) if symmetric else (-1.25, 2.5)  # a step of 0.25 (zero point 5 when unsigned)
    x = torch.randn(4, 5, 6) * 2
    x.view(-1)[:16] = (torch.arange(16) - 8.5) * 0.25
    scales, zero_points = qparams(lo, hi, quantizer.scheme)
    expected = [fake_quantize(x, s, z, quantizer.scheme) for s, z in zip(scales, zero_points)]
    assert torch.equal(_per_tensor(x, lo, hi, quantizer), torch.stack(expected))


def test_a_sampled_product_weighs_each_row_against_its_own_group_whatever_their_order():
    """:class:`_Product`'s candidate errors are ``sum(g^2 (Q(a_r) Q(B_group(r)) - a_r B_group(r))^2)`` over its rows,
    however the rows come ordered (it lays them out by group) and with groups no row reads left out."""
    from leanvit.compress.quant.hessian import _Product
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme

    torch.manual_seed(0)
    a_rows, b = torch.randn(9, 5), torch.randn(4, 5, 3)  # 9 rows reading groups 0, 1 and 3 of 4
    groups, grad_sq = torch.tensor([3, 0, 1, 3, 0, 3, 1, 0, 3]), torch.rand(9, 3)
    quantizers = [FakeQuantizer(QScheme(4, symmetric=True), axis=-1, channels=1) for _ in range(2)]
    for quantizer, t in zip(quantizers, (a_rows, b)):
        quantizer.set_range(t.min(), t.max())
    lo, hi = torch.tensor([-1.0, -2.5]), torch.tensor([1.0, 2.5])
    product = _Product(*quantizers, a_rows, groups, b, grad_sq)
    errors = product.error(0, lo, hi, product.quantized(1))
    b_hat = quantizers[1].quantize(b)
    for i, (l, h) in enumerate(zip(lo, hi)):
        probe = FakeQuantizer(QScheme(4, symmetric=True), axis=-1, channels=1)
        probe.set_range(l, h)
        rows = torch.einsum("rk,rkn->rn", probe.quantize(a_rows), b_hat[groups])
        expected = (grad_sq * (rows - torch.einsum("rk,rkn->rn", a_rows, b[groups])).pow(2)).sum()
        torch.testing.assert_close(errors[i], expected)


class TwoBranches(nn.Module):
    """Two layers with the very same weights reading the same input, one's output amplified 10x on its way to the
    head: the loss is 100x as curved in its weights, though their quantization errors are identical."""

    def __init__(self):
        super().__init__()
        self.loud, self.quiet = nn.Linear(16, 16), nn.Linear(16, 16)
        self.quiet.load_state_dict(self.loud.state_dict())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(10 * self.loud(x) + self.quiet(x))


def test_hessian_sensitivity_weighs_the_weight_error_by_the_hessian_trace():
    """HAWQ's ``Tr(H) / n * ||Q(W) - W||^2``: two layers quantized alike differ by how the loss curves in their
    weights, which the quantization error alone does not see."""
    torch.manual_seed(0)
    model = TwoBranches().eval()
    calib = torch.randn(32, 1, 4, 4)
    config = QuantConfig(w_bits=4, a_bits=8)
    sensitivity = layer_sensitivity(model, calib, config, method="hessian")
    qmodel = quantize(model, calib, config, progress=False)
    with torch.no_grad():
        errors = {n: float((m.weight_quantizer(m.weight) - m.weight).pow(2).sum())
                  for n, m in (("loud", qmodel.loud), ("quiet", qmodel.quiet))}
    assert errors["loud"] == errors["quiet"] > 0
    assert sensitivity["loud"] > 30 * sensitivity["quiet"]
    traces = hessian_traces(model, calib, {n: model.get_submodule(n).weight for n in sensitivity})  # its draws
    for name in ("loud", "quiet"):
        assert sensitivity[name] == pytest.approx(traces[name] * errors[name], rel=1e-4)


def test_the_layer_search_weighs_each_output_channel_by_its_squared_gradient():
    """The gradient weighs output channels too, not only positions: where the loss reads one channel through a gain
    of 100 (squared gradient 1e4, the others 1), the input range must serve the small feature that channel alone
    reads, clipping the large ones the other channels read. A plain output MSE keeps the wide range, on whose
    steps the small feature rounds away: its gradient-weighted error is 3.5x the weighted search's."""
    from leanvit.compress.quant.hessian import _matmul, _quantized_rows, _search_layer
    from leanvit.compress.quant.quantizer import QScheme

    def searched(grad_sq):
        torch.manual_seed(0)
        linear = nn.Linear(16, 32)
        with torch.no_grad():
            linear.weight[:, 0] = 0.0  # no other channel reads feature 0,
            linear.weight[0] = F.one_hot(torch.tensor(0), 16)  # and channel 0 reads it alone
        layer = QuantLinear.from_float(linear, QScheme(4, True, True), QScheme(4, symmetric=False))
        layer.weight_quantizer.set_range(-layer.weight.detach().abs().amax(1), layer.weight.detach().abs().amax(1))
        x = torch.randn(256, 1, 16)  # sampled rows (N, groups, K)
        x[:, :, 0] *= 0.05  # feature 0 is 20x smaller than the rest
        layer.input_quantizer.set_range(x.min(), x.max())
        _search_layer(layer, x, grad_sq, rounds=2, search_input=True)
        with torch.no_grad():
            err = _matmul(_quantized_rows(x, layer.input_quantizer), layer.weight_quantizer(layer.weight)) - _matmul(
                x, layer.weight)
        return layer, float((gain * err.pow(2)).sum()), float(err.pow(2).sum())

    gain = torch.ones(256, 32)
    gain[:, 0] = 1e4
    weighted, weighted_err, weighted_plain_err = searched(gain)
    plain, plain_weighted_err, plain_err = searched(torch.ones(256, 32))
    assert weighted_err < 0.5 * plain_weighted_err
    assert weighted_plain_err > 10 * plain_err  # a different objective: the plain output MSE is what it gives up
    assert weighted.input_quantizer.scale < 0.3 * plain.input_quantizer.scale


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                                   nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                                   nn.Conv2d(4, 4, (3, 1), padding=(1, 0), padding_mode="circular"),
                                   nn.Linear(4, 6)])
def test_sampled_input_rows_and_output_rows_are_the_same_positions(layer):
    """The search compares ``rows @ W`` with the layer's output at each sampled position: the input rows must be
    padded as the layer pads (reflect, circular) and the output rows ordered position by position as the input
    rows are, or every error it weighs is that of some other position's output."""
    from leanvit.compress.quant.hessian import _input_rows, _matmul, _output_rows

    torch.manual_seed(0)
    with torch.no_grad():
        layer.bias.normal_()
        x = torch.randn(2, 4, 7, 6) if isinstance(layer, nn.Conv2d) else torch.randn(2, 5, 4)
        torch.testing.assert_close(_matmul(_input_rows(layer, x), layer.weight) + layer.bias,
                                   _output_rows(layer, layer(x)), atol=1e-5, rtol=1e-5)


def test_every_batch_gets_its_share_of_the_rows_rounded_up():
    """A batch's share of the sampled rows is rounded up: a small last batch (or one image) still gives rows."""
    from leanvit.compress.quant.hessian import _gradient_batches

    batches = [torch.zeros(8, 1), torch.ones(8, 1), torch.full((1, 1), 2.0)]
    assert [(len(b), keep) for b, keep in _gradient_batches(batches, 17, 8)] == [(8, 4), (8, 4), (1, 1)]
    assert [(len(b), keep) for b, keep in _gradient_batches(batches, 10, 64)] == [(8, 52), (2, 13)]  # first 10


def test_the_ratio_search_refines_around_the_best_grid_ratio_per_row_and_keeps_a_better_start():
    """20 ratios, then 21 within 0.05 of the best one, each row on its own; a start no candidate beats stays."""
    from leanvit.compress.quant.hessian import _ratio_search

    optimum = torch.tensor([0.523, 0.871, 0.1234])
    best = _ratio_search(lambda ratios: (ratios - optimum).pow(2), torch.ones(3))
    assert (best - optimum).abs().max() <= 0.0026  # the fine grid's half step; the coarse one alone: 0.025
    assert torch.equal(_ratio_search(lambda ratios: (ratios - optimum).pow(2), optimum), optimum)


@torch.no_grad()
def test_the_layer_search_never_worsens_a_channel_and_keeps_the_range_of_one_the_loss_ignores():
    """Each weight row's search starts from its calibrated ratio, which a candidate replaces only if strictly
    better: a row calibrated at its optimum (off the search's grid) keeps it, and a channel with no gradient, whose
    error is 0 whatever its range, keeps its calibrated scale bit for bit (not the last candidate tried)."""
    from leanvit.compress.quant.hessian import _matmul, _quantized_rows, _search_layer
    from leanvit.compress.quant.quantizer import QScheme, fake_quantize, qparams

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(16, 8), QScheme(4, True, True), QScheme(8, symmetric=False))
    x = torch.randn(128, 1, 16)
    layer.input_quantizer.set_range(x.min(), x.max())
    grad_sq = torch.rand(128, 8)
    grad_sq[:, 3] = 0.0  # the loss does not read channel 3
    weight, x_hat = layer.weight.detach(), _quantized_rows(x, layer.input_quantizer)
    bound = weight.abs().amax(1)

    def errors(scale):  # per output channel, the search's objective
        w_hat = fake_quantize(weight, scale, torch.zeros(8, dtype=torch.int32), layer.weight_quantizer.scheme)
        return (grad_sq * (_matmul(x_hat, w_hat) - _matmul(x, weight)).pow(2)).sum(0)

    dense = torch.linspace(0.3, 1.0, 701)
    table = torch.stack([errors(qparams(-bound * r, bound * r, layer.weight_quantizer.scheme)[0]) for r in dense])
    ratio = dense[table.argmin(0)]
    ratio[3] = 0.777
    layer.weight_quantizer.set_range(-bound * ratio, bound * ratio)
    before_scale, before = layer.weight_quantizer.scale.clone(), errors(layer.weight_quantizer.scale)
    _search_layer(layer, x, grad_sq, rounds=2, search_input=False)
    assert (errors(layer.weight_quantizer.scale) <= before * (1 + 1e-6)).all()
    assert layer.weight_quantizer.scale[3] == before_scale[3]


def test_the_widened_input_range_takes_in_sampled_values_beyond_either_end():
    """The zero-point-keeping family is the calibrated range widened by the most any sampled value passes it, on the
    negative side as on the positive one; its start ratio gives the calibrated range back."""
    from leanvit.compress.quant.hessian import _input_range_families

    current = (torch.tensor([-3.0]), torch.tensor([5.0]))
    for x, widen in ((torch.tensor([-6.0, 1.0]), 2.0), (torch.tensor([-1.0, 7.5]), 1.5),
                     (torch.tensor([-1.0, 2.0]), 1)):
        (lo, hi, start), _ = _input_range_families(x, *current)
        torch.testing.assert_close((lo, hi, start), (current[0] * widen, current[1] * widen, torch.ones(1) / widen))


class RecordedMixing(nn.Module):
    """``q @ kᵀ`` over the tokens, keeping each product computed with gradients (``outputs``)."""

    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.outputs = []

    def forward(self, t):
        q, k = self.qk(t).chunk(2, -1)
        attn = q @ k.transpose(-2, -1)
        if attn.requires_grad:
            self.outputs.append(attn.detach())
        return attn.softmax(-1) @ t


class RecordedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.head = RecordedMixing(), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.mix(x.flatten(2).transpose(1, 2)).mean(1))


def test_sampled_product_rows_read_their_own_batchs_operand_over_several_batches():
    """Each sampled row of ``A`` keeps the index of the ``B`` it reads among all batches' groups: a second batch's
    rows, numbered from 0 again, would read the first batch's ``B`` and weigh the errors of products never computed."""
    from leanvit.compress.quant.hessian import _collect_products, _matmul_quantizers

    torch.manual_seed(0)
    calib = torch.randn(16, 8, 2, 3)
    qmodel = quantize(RecordedAttention().eval(), calib, QuantConfig(attn_bits=8, attn_max_error=None, min_images=16),
                      progress=False)
    qmodel.mix.outputs.clear()
    found = _collect_products(qmodel, _matmul_quantizers(qmodel), list(calib.split(8)), 16, 64,
                              torch.Generator().manual_seed(0))
    a_rows, groups, b, _ = found[("mix.matmul0_a_quantizer", "mix.matmul0_b_quantizer")]
    outputs = torch.cat(qmodel.mix.outputs)  # (16 groups: 8 per batch, 6 tokens, 6 tokens)
    assert len(qmodel.mix.outputs) == 2 and len(b) == 16 and groups.max() >= 8
    rows = torch.einsum("rk,rkn->rn", a_rows, b[groups])
    gaps = (rows[:, None, :] - outputs[groups]).abs().amax(-1).amin(-1)  # to the nearest row of its group's product
    assert gaps.max() < 1e-5


def test_the_search_runs_every_batch_and_alternates_the_operand_ranges_for_every_round(monkeypatch):
    """Layers are sampled on every calibration batch (two batches, two layers: four draws), and each product's
    operand ranges are searched once per round, in turn (rounds=3: three searches of each of its four quantizers)."""
    import leanvit.compress.quant.hessian as hessian

    torch.manual_seed(0)
    calib = torch.randn(16, 16, 16, 16)
    qmodel = quantize(ClsTokens().eval(), calib, QuantConfig(w_bits=4, a_bits=4, batch_size=8), progress=False)
    draws, draw_rows = [], hessian._draw_rows
    monkeypatch.setattr(hessian, "_draw_rows", lambda g, keep, gen: draws.append(keep) or draw_rows(g, keep, gen))
    assert hessian.hessian_search(qmodel, list(calib.split(8)), products=False, progress=False) == ["fc", "head"]
    assert len(draws) == 4
    monkeypatch.undo()

    model = ClsAttention().eval()
    calib = torch.randn(32, 8, 4, 4)
    qmodel = quantize(model, calib, QuantConfig(w_bits=8, a_bits=8, attn_bits=4, min_images=16), progress=False)
    searches, search = [], hessian._input_range_search
    monkeypatch.setattr(hessian, "_input_range_search",
                        lambda error, current, families: searches.append(current) or search(error, current, families))
    hessian.hessian_search(qmodel, [calib], fixed_inputs={"mix.qk", "head"}, rounds=3, progress=False)
    assert len(searches) == 3 * len(QUANTIZERS)


@pytest.mark.parametrize("shape", [(10,), (2, 5, 10)])
def test_the_pseudo_label_loss_needs_batch_by_class_logits(shape):
    """Logits of one image or of every token have no per-image top-1 class to take as the label: an error naming
    the shape the model returned, not cross entropy over the wrong dim."""
    from leanvit.compress.quant.hessian import pseudo_label_loss

    with pytest.raises(LeanvitError, match=r"this model returns " + re.escape(str(shape))):
        pseudo_label_loss(torch.randn(shape), "hessian_search")


class MeanTokens(nn.Module):
    """Pixels as tokens through ``fc``, averaged into the head; ``dead``'s output reaches the loss times 0."""

    def __init__(self):
        super().__init__()
        self.fc, self.dead, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        return self.head(torch.tanh(self.fc(t)).mean(1) + 0 * self.dead(t).mean(1))


def test_sampled_rows_carry_their_squared_output_gradients_weighted_by_the_draws():
    """Each sampled row of a layer comes with ``g^2`` at its output (``g`` the pseudo-label loss gradient there), times
    the times it was drawn over ``keep`` times its draw probability ``|g|^2 / sum |g|^2``: PTQ4ViT's diagonal
    Fisher weight, estimated without bias. Checked against autograd's gradient at each row's own position."""
    from leanvit.compress.quant.hessian import _collect

    torch.manual_seed(0)
    calib = torch.randn(16, 4, 2, 3)
    qmodel = quantize(MeanTokens().eval(), calib, QuantConfig(), progress=False)
    found = {}
    handle = qmodel.fc.register_forward_hook(lambda _, args, out: found.update(x=args[0], out=out.retain_grad() or out))
    with torch.enable_grad(), quantizers_disabled(qmodel):
        logits = qmodel(calib)
        F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
    handle.remove()
    inputs, g_sq = found["x"].detach().reshape(-1, 4), found["out"].grad.reshape(-1, 6).pow(2)
    x_rows, weighted = _collect(qmodel, {"fc": qmodel.fc}, [calib], 16, 64, torch.Generator().manual_seed(0))["fc"]
    index = (x_rows[:, 0, None, :] == inputs).all(-1).float().argmax(1)  # each sampled row's position
    assert torch.equal(inputs[index], x_rows[:, 0])
    p = g_sq.sum(1) / g_sq.sum()
    draws = weighted / (g_sq[index] / (64 * p[index])[:, None])
    torch.testing.assert_close(draws, draws[:, :1].round().expand(-1, 6), rtol=1e-4, atol=1e-4)
    assert draws[:, 0].round().sum() == 64


def test_a_layer_the_loss_does_not_read_keeps_its_ranges_and_is_not_searched():
    """A layer whose output reaches the loss times 0 has a zero gradient everywhere: no row to draw (no probability
    to draw it with), so it keeps its calibrated ranges and is left out of the layers searched."""
    from leanvit.compress.quant.hessian import hessian_search

    torch.manual_seed(0)
    calib = torch.randn(16, 4, 2, 3)
    qmodel = quantize(MeanTokens().eval(), calib, QuantConfig(w_bits=4, a_bits=4), progress=False)
    before = {n: t.clone() for n, t in qmodel.dead.state_dict().items()}
    assert hessian_search(qmodel, [calib], progress=False) == ["fc", "head"]
    assert all(torch.equal(t, qmodel.dead.state_dict()[n]) for n, t in before.items())


class InPlace(nn.Module):
    """``fc2``'s input changed in place after ``fc2`` read it: with frozen weights autograd keeps no copy of it, so
    nothing else notices that the input rows recorded are not those the layer read."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        t = self.fc1(x.flatten(2).transpose(1, 2))
        y = self.fc2(t)
        t.mul_(2)
        return self.head((y + t).mean(1))


def test_an_input_modified_in_place_after_the_layer_read_it_is_an_error():
    torch.manual_seed(0)
    model = InPlace().eval().requires_grad_(False)
    with pytest.raises(RuntimeError, match="the input of fc2 was modified in place"):
        quantize(model, torch.randn(16, 4, 2, 3), QuantConfig(hessian_search=True), progress=False)


def test_the_ratio_search_reaches_small_ratios_but_never_a_zero_scale():
    """The coarse grid starts at 0.05, so a row whose best ratio is 0.03 gets it from the fine pass; the fine pass's
    ratios stop at 0.005, however much the error favours smaller ones (a ratio of 0 is a zero scale)."""
    from leanvit.compress.quant.hessian import _ratio_search

    best = _ratio_search(lambda ratios: (ratios - 0.03).pow(2), torch.ones(1))
    assert float(best) == pytest.approx(0.03, abs=0.0026)
    assert _ratio_search(lambda ratios: ratios.pow(2), torch.ones(2)).tolist() == pytest.approx([0.005] * 2)


@torch.no_grad()
def test_each_rounds_weight_search_reads_the_inputs_at_the_range_the_last_input_search_chose(monkeypatch):
    """The layer search alternates: each round searches the weight ranges against the inputs quantized as they stand
    (the calibrated range first, then each input search's result), then the input range; ``rounds`` times."""
    import leanvit.compress.quant.hessian as hessian
    from leanvit.compress.quant.hessian import _matmul
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(6, 4), QScheme(4, True, True), QScheme(4, symmetric=False))
    layer.weight_quantizer.set_range(-layer.weight.abs().amax(1), layer.weight.abs().amax(1))
    x, grad_sq = torch.randn(32, 1, 6), torch.rand(32, 4)
    layer.input_quantizer.set_range(x.min(), x.max())
    chosen = [(torch.tensor([-0.5 * i]), torch.tensor([0.7 * i])) for i in (1, 2, 3)]  # each input search's result
    costs, inputs = [], iter(chosen)
    monkeypatch.setattr(hessian, "_ratio_search", lambda error, start: costs.append(error(start[None])[0]) or start)
    monkeypatch.setattr(hessian, "_input_range_search", lambda error, current, families: next(inputs))
    w_hat = layer.weight_quantizer(layer.weight)
    hessian._search_layer(layer, x, grad_sq, rounds=3, search_input=True)
    grids = []
    for lo, hi in [(x.min(), x.max()), *chosen[:2]]:
        probe = FakeQuantizer(QScheme(4, symmetric=False), axis=-1, channels=1)
        probe.set_range(lo, hi)
        grids.append((grad_sq * (_matmul(probe(x), w_hat) - _matmul(x, layer.weight)).pow(2)).sum(0))
    assert len(costs) == 3 and next(inputs, None) is None
    for cost, expected in zip(costs, grids):
        torch.testing.assert_close(cost, expected)


@torch.no_grad()
def test_the_weight_search_gives_each_row_its_own_ratio():
    """Output channel ``c`` depends on weight row ``c`` alone, so each row's ratio is searched on its own error: every
    row ends at least as good as the best ratio of the coarse grid for it alone, though those differ from row to row
    (one ratio for all rows, searched on their summed error, leaves rows off their own best)."""
    from leanvit.compress.quant.hessian import _matmul, _quantized_rows, _search_layer
    from leanvit.compress.quant.quantizer import QScheme, fake_quantize, qparams

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(16, 4), QScheme(3, True, True), QScheme(8, symmetric=False))
    layer.weight[1, 0] = 3.0  # an outlier weight in row 1
    layer.weight[2] = torch.linspace(-1, 1, 16)  # evenly spread weights in row 2
    x, grad_sq = torch.randn(128, 1, 16), torch.rand(128, 4)
    layer.input_quantizer.set_range(x.min(), x.max())
    weight, x_hat = layer.weight.detach().clone(), _quantized_rows(x, layer.input_quantizer)
    bound = weight.abs().amax(1)
    layer.weight_quantizer.set_range(-bound, bound)

    def errors(scale):  # per output channel, the search's objective
        w_hat = fake_quantize(weight, scale, torch.zeros(4, dtype=torch.int32), layer.weight_quantizer.scheme)
        return (grad_sq * (_matmul(x_hat, w_hat) - _matmul(x, weight)).pow(2)).sum(0)

    table = torch.stack([errors(qparams(-bound * r, bound * r, layer.weight_quantizer.scheme)[0])
                         for r in torch.linspace(0.05, 1.0, 20)])
    assert len(set(table.argmin(0).tolist())) > 1
    _search_layer(layer, x, grad_sq, rounds=1, search_input=False)
    assert (errors(layer.weight_quantizer.scale) <= table.amin(0) * (1 + 1e-6)).all()


def test_products_seen_at_two_sizes_are_searched_on_the_first_sizes_rows():
    """hessian_search on batches of two image sizes: a product's rows at another size than its first call's cannot
    join them (their ``B`` has another shape), so the first size's rows serve, and every operand is still searched."""
    from leanvit.compress.quant.hessian import hessian_search

    torch.manual_seed(0)
    calib = torch.randn(16, 8, 4, 4)
    qmodel = quantize(ClsAttention().eval(), calib, QuantConfig(attn_bits=4, min_images=16), progress=False)
    searched = hessian_search(qmodel, [calib[:8], torch.randn(8, 8, 2, 4)], products=True, progress=False)
    assert {f"mix.{name}" for name in QUANTIZERS} <= set(searched)


@torch.no_grad()
def test_a_shared_quantizers_widened_range_takes_in_what_every_product_reads(monkeypatch):
    """A quantizer two products read is searched from its calibrated range widened to take in the operand values of
    both (here the second's reach 3, past the first's and the calibrated range's 1)."""
    import leanvit.compress.quant.hessian as hessian
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme

    torch.manual_seed(0)
    shared, b1, b2 = (FakeQuantizer(QScheme(4, symmetric=True), axis=-1, channels=1) for _ in range(3))
    for q in (shared, b1, b2):
        q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    a1, a2 = torch.rand(6, 5) * 1.8 - 0.9, torch.rand(6, 5) * 1.8 - 0.9
    a2[2, 3] = 3.0
    groups = torch.zeros(6, dtype=torch.long)
    first = hessian._Product(shared, b1, a1, groups, torch.randn(1, 5, 4), torch.rand(6, 4))
    second = hessian._Product(shared, b2, a2, groups, torch.randn(1, 5, 4), torch.rand(6, 4))
    families = []  # each search's candidate families, in the order searched
    monkeypatch.setattr(hessian, "_input_range_search",
                        lambda error, current, fams: families.append(fams) or current)
    feeds = {shared: [(first, 0), (second, 0)], b1: [(first, 1)], b2: [(second, 1)]}
    assert hessian._search_product(first, feeds, rounds=1) == [0, 1]
    (lo, hi, start), = families[0]  # the shared quantizer's, searched first
    torch.testing.assert_close((lo, hi, start), (torch.tensor([-3.0]), torch.tensor([3.0]), torch.tensor([1 / 3])))


def test_quantize_searches_each_layer_for_a_couple_of_rounds(monkeypatch):
    """``QuantConfig(hessian_search=True)`` alternates the weight and input ranges of each layer twice: once would
    search the input range against weights whose ranges were never searched with it."""
    import leanvit.compress.quant.hessian as hessian

    torch.manual_seed(0)
    searches, search = [], hessian._input_range_search
    monkeypatch.setattr(hessian, "_input_range_search",
                        lambda error, current, families: searches.append(1) or search(error, current, families))
    quantize(MeanTokens().eval(), torch.randn(16, 4, 2, 3), QuantConfig(hessian_search=True), progress=False)
    assert len(searches) == 2 * 2  # fc and head, twice each (dead is not searched)


def test_hessian_sensitivity_takes_the_draws_asked_and_scores_a_frozen_model():
    """``samples`` Hutchinson draws, as :func:`hessian_traces` takes them; a model whose weights need no gradient (a
    frozen checkpoint) is scored all the same, on the scoring copy's own weights."""
    import copy

    from leanvit.compress.quant import layer_sensitivity
    from leanvit.compress.quant.mixed import hessian_traces

    torch.manual_seed(0)
    model = TwoBranches().eval()
    calib = torch.randn(32, 1, 4, 4)
    config = QuantConfig(w_bits=4, a_bits=8)
    frozen = copy.deepcopy(model).requires_grad_(False)
    sensitivity = layer_sensitivity(frozen, calib, config, method="hessian", samples=3)
    assert not any(p.requires_grad for p in frozen.parameters())
    qmodel = quantize(model, calib, config, progress=False)
    traces = hessian_traces(model, calib, {n: model.get_submodule(n).weight for n in sensitivity}, samples=3)
    with torch.no_grad():
        for name in ("loud", "quiet", "head"):
            layer = qmodel.get_submodule(name)
            error = float((layer.weight_quantizer(layer.weight) - layer.weight).pow(2).sum())
            assert sensitivity[name] == pytest.approx(traces[name] * error, rel=1e-4)


@torch.no_grad()
def test_a_product_range_no_candidate_beats_keeps_its_scale_and_zero_point(monkeypatch):
    """As for a layer's: an operand range the search keeps is not set again from its grid range (whose scale and
    zero point can come back rounded otherwise)."""
    import leanvit.compress.quant.hessian as hessian
    from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme

    torch.manual_seed(0)
    quantizers = [FakeQuantizer(QScheme(4, symmetric=s), axis=-1, channels=1) for s in (False, True)]
    quantizers[0].set_range(torch.tensor(-0.3137), torch.tensor(1.4421))
    quantizers[1].set_range(torch.tensor(-0.7071), torch.tensor(0.7071))
    before = [t.clone() for q in quantizers for t in q.state_dict().values()]
    product = hessian._Product(*quantizers, torch.randn(6, 5), torch.zeros(6, dtype=torch.long), torch.randn(1, 5, 4),
                               torch.rand(6, 4))
    monkeypatch.setattr(hessian, "_input_range_search", lambda error, current, families: current)
    hessian._search_product(product, {q: [(product, side)] for side, q in enumerate(quantizers)}, rounds=2)
    assert all(torch.equal(a, b) for a, b in zip([t for q in quantizers for t in q.state_dict().values()], before))
