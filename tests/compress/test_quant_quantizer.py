"""The quantizers as modules: their state dict describes them whole, and they follow a model's moves and casts."""
import pytest
import torch

from leanvit.compress.quant import QuantConfig, quantize
from leanvit.compress.quant.quantizer import FakeQuantizer, QScheme, RangeObserver, fake_quantize, qparams
from leanvit.errors import LeanvitError


def _input_grids(qmodel):
    return {n: str(m.scheme) for n, m in qmodel.named_modules() if isinstance(m, FakeQuantizer)}


@pytest.mark.parametrize("other", [dict(a_symmetric="auto"), dict(w_bits=4, a_bits=6)], ids=["auto-symmetry", "bits"])
def test_a_state_dict_brings_its_integer_grids(tiny_vit, other):
    """The scale and zero point were saved without their grid: where the fresh model chose another (uint8 for int8,
    as ``a_symmetric="auto"`` does on other calibration images, or other bits) the load matched every key and the
    model computed something else, silently."""
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 32, 32)
    saved = quantize(tiny_vit, calib, QuantConfig(a_symmetric=True, min_images=8), progress=False)
    fresh = quantize(tiny_vit, calib.abs() + 0.5, QuantConfig(**other, min_images=8), progress=False)
    assert _input_grids(fresh) != _input_grids(saved)
    fresh.load_state_dict(saved.state_dict())
    assert _input_grids(fresh) == _input_grids(saved)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))


def test_a_state_dict_saved_without_grids_still_loads(tiny_vit):
    """State dicts saved before the grid was kept load as they did: each quantizer keeps its own grid."""
    calib = torch.randn(16, 3, 32, 32)
    saved = quantize(tiny_vit, calib, QuantConfig(a_symmetric=True, min_images=8), progress=False)
    qmodel = quantize(tiny_vit, calib, QuantConfig(a_symmetric=False, min_images=8), progress=False)
    own = _input_grids(qmodel)
    assert own != _input_grids(saved)
    old = {k: v for k, v in saved.state_dict().items() if not k.endswith("qrange")}
    qmodel.load_state_dict(old)
    assert _input_grids(qmodel) == own
    assert all(torch.equal(t, qmodel.state_dict()[k]) for k, t in old.items())
    bad = {**old, "head.input_quantizer.qrange": torch.tensor([0, 100], dtype=torch.int32)}
    with pytest.raises(LeanvitError, match=r"head.input_quantizer.qrange is \[0, 100\], not the integer grid"):
        qmodel.load_state_dict(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_quantized_model_cast_to_half_runs(tiny_vit, dtype):
    """``qmodel.half()`` cast the scales too, and torch's fake-quantize kernels take no half scale: a RuntimeError
    ("Scale must be Float or BFloat16, found Half") on the first call. The scales stay float32."""
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 32, 32)
    qmodel = quantize(tiny_vit, calib, QuantConfig(min_images=8), progress=False)
    with torch.no_grad():
        ref = qmodel(calib[:4])
        out = qmodel.to(dtype)(calib[:4].to(dtype))
    assert out.dtype == dtype and qmodel.head.input_quantizer.scale.dtype == torch.float32
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_the_report_describes_the_grids_a_state_dict_brought(tiny_vit):
    """The load takes the saved grids; the report, written when the model was quantized, still said int4 / uint6."""
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 32, 32)
    saved = quantize(tiny_vit, calib, QuantConfig(a_symmetric=True, min_images=8), progress=False)
    fresh = quantize(tiny_vit, calib, QuantConfig(w_bits=4, a_bits=6, min_images=8), progress=False)
    assert fresh.quant_report.quantized != saved.quant_report.quantized
    fresh.load_state_dict(saved.state_dict())
    assert fresh.quant_report.quantized == saved.quant_report.quantized
    assert fresh.quant_report.weight_bits == saved.quant_report.weight_bits


def test_the_integer_grids_are_the_full_signed_and_unsigned_ranges():
    """int8 is -128..127 (the exporter's int8, and twice the levels' reach at 4 bits: -8..7), uint8 0..255."""
    assert [(QScheme(b).qmin, QScheme(b).qmax) for b in (4, 6, 8)] == [(-8, 7), (-32, 31), (-128, 127)]
    assert [(QScheme(b, symmetric=False).qmin, QScheme(b, symmetric=False).qmax) for b in (4, 8)] == [(0, 15), (0, 255)]


def test_an_asymmetric_zero_point_is_the_nearest_integer_to_minus_lo_over_scale():
    """So both ends of the calibrated range land within half a step (a floored zero point clips the top by up to one
    step): [-1.1, 3] at 8 bits has -lo / scale = 68.4, zero point 68."""
    lo = torch.tensor([-1.1, -0.3, -2.0, -0.01]).repeat(8) * torch.rand(32, generator=torch.Generator().manual_seed(0))
    hi = torch.full_like(lo, 3.0)
    for bits in (4, 8):
        scheme = QScheme(bits, symmetric=False)
        scale, zero = qparams(lo, hi, scheme)
        assert torch.equal(zero, torch.round(-lo / scale).to(torch.int32))
        ends = torch.stack([lo, hi], dim=1)
        error = fake_quantize(ends, scale, zero, scheme, axis=0) - ends
        assert error.abs().le(scale[:, None] / 2 + 1e-6).all()
    assert qparams(torch.tensor(-1.1), torch.tensor(3.0), QScheme(8, symmetric=False))[1] == 68


def test_the_held_out_error_weighs_each_input_channel_by_its_consumers_weights():
    """The symmetry / granularity choice minimises the consuming layer's output error: channel weights [1, 0] score
    channel 0's held-out error alone."""
    observer = RangeObserver(axis=-1)
    generator = torch.Generator().manual_seed(0)
    observer.update(torch.cat([torch.rand(512, 1, generator=generator), 50 * torch.randn(512, 1, generator=generator)], 1))
    scheme = QScheme(4, symmetric=False, per_channel=True)
    both = observer.held_out_error(scheme, "minmax", torch.tensor([1.0, 1.0]))
    first, second = (observer.held_out_error(scheme, "minmax", torch.tensor(w)) for w in ([1.0, 0.0], [0.0, 1.0]))
    assert first + second == pytest.approx(both) and second > 100 * first
    fit, held = observer.rows[0::2, 0], observer.rows[1::2, 0]
    scale, zero = qparams(fit.min(), fit.max(), scheme)
    assert first == pytest.approx(float((fake_quantize(held, scale, zero, scheme) - held).pow(2).mean()))


def test_a_constant_zero_channel_still_gets_a_positive_scale():
    """A weight row or input channel that is all zeros (a pruned filter, a dead ReLU) spans no range: its scale is
    MIN_SCALE, not 0, which the exported QuantizeLinear would divide by."""
    from leanvit.compress.quant.quantizer import MIN_SCALE

    zeros = torch.zeros(3)
    for symmetric in (True, False):
        scale, zero = qparams(zeros, zeros, QScheme(8, symmetric=symmetric, per_channel=True))
        assert scale.tolist() == pytest.approx([MIN_SCALE] * 3, rel=1e-6) and zero.tolist() == [0, 0, 0]


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_mse_search_finds_the_best_clipping_ratio_to_half_a_percent(bits, symmetric):
    """Two passes (20 ratios, then 21 steps of 0.005 around the best) reach what a brute-force search of every ratio
    0.005, 0.010, ..., 1 finds, on bell-shaped and heavy-tailed data."""
    from leanvit.compress.quant import choose_range

    generator = torch.Generator().manual_seed(bits)
    scheme = QScheme(bits, symmetric=symmetric)
    for values in (torch.randn(1, 20000, generator=generator),
                   torch.randn(1, 20000, generator=generator).pow(3)):  # heavy tails: a small best ratio

        def error(lo, hi):
            scale, zero = qparams(lo, hi, scheme)
            return float((fake_quantize(values[0], scale[0], zero[0], scheme) - values[0]).pow(2).mean())

        lo, hi = values.amin(1), values.amax(1)
        dense = min(error(lo * r, hi * r) for r in torch.arange(1, 201) * 0.005)
        assert error(*choose_range(values, lo, hi, scheme, "mse")) <= dense * (1 + 1e-5)


@pytest.mark.parametrize("scheme", [QScheme(8), QScheme(4), QScheme(8, symmetric=False), QScheme(6, symmetric=False)])
def test_the_grid_range_is_the_span_set_range_maps_back_onto_the_same_grid(scheme):
    """The Hessian search scales ``grid_range()`` by ratios and sets the result: an int8 grid spans +-127 steps
    (-128 steps would widen the scale by 128/127), a uint8 one (0 - z) to (255 - z) steps."""
    quantizer = FakeQuantizer(scheme, axis=-1, channels=1)
    quantizer.set_range(torch.tensor(-0.7), torch.tensor(2.3))
    scale, zero = quantizer.scale.clone(), quantizer.zero_point.clone()
    lo, hi = quantizer.grid_range()
    assert float(hi - lo) == pytest.approx(float(scale) * (2 * scheme.qmax if scheme.symmetric else scheme.qmax))
    assert float(lo) <= -0.7 + float(scale) and float(hi) >= 2.3 - float(scale)
    quantizer.set_range(lo, hi)
    assert torch.allclose(quantizer.scale, scale, rtol=1e-6) and torch.equal(quantizer.zero_point, zero)
    quantizer.set_range(lo * 0.5, hi * 0.5)
    assert torch.allclose(quantizer.scale, scale * 0.5, rtol=1e-6) and torch.equal(quantizer.zero_point, zero)


def test_the_sample_holds_about_limit_values_and_the_exact_extremes():
    """The post-softmax quantizers fit on ``sample()``: whole rows up to ``limit`` values, plus the exact minimum and
    maximum over every batch, which the kept rows can miss."""
    observer = RangeObserver(axis=-1, max_values=4096)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        observer.update(torch.rand(64, 8, generator=generator))
    observer.update(torch.tensor([[-5.0] + [0.5] * 7, [0.5] * 7 + [9.0]]))  # extremes in two rows among 258
    sample = observer.sample(limit=80)
    assert sample.numel() == 80 + 2
    assert torch.equal(sample[:80], observer.rows[:10].flatten())
    assert sample.min() == -5.0 and sample.max() == 9.0


@pytest.mark.parametrize("shift", [1, 2, 3, 4, 5])
def test_twin_uniform_decodes_onto_its_two_b_minus_1_bit_grids_only(shift):
    """Each grid has 2^(b-1) codes, 0 .. 2^(b-1)-1: the fine grid tops out at 7 d1 and the coarse one at 1 - d2 (a
    softmax's 1.0 included) at 4 bits; an eighth step on either is a value no 4-bit code holds."""
    from leanvit.compress.quant.quantizer import TwinUniformQuantizer

    q = TwinUniformQuantizer(4)
    q.fine_step.fill_(q.coarse_step * 2.0**-shift)
    fine, coarse = q.fine_step.item(), q.coarse_step
    out = q(torch.linspace(0, 1, 20001)).tolist()
    levels = {k * fine for k in range(8)} | {k * coarse for k in range(8)}
    assert set(out) <= levels and max(out) == 1 - coarse
    assert q(torch.tensor([7.6 * fine])).item() == 7 * fine  # the fine grid's top code, not an eighth step


def test_weight_ranges_follow_the_method_per_output_channel_or_per_tensor():
    """``weight_range`` searches each output channel's clipping (``w_method``), or the whole tensor's: heavy-tailed
    rows get MSE ranges inside their min-max."""
    from leanvit.compress.quant import choose_range
    from leanvit.compress.quant.quantizer import weight_range

    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)).pow(3)
    rows = weight.flatten(1)
    for per_channel in (True, False):
        scheme = QScheme(4, symmetric=True, per_channel=per_channel)
        values = rows if per_channel else rows.reshape(1, -1)
        for method in ("minmax", "mse", "percentile"):
            lo, hi = weight_range(weight, scheme, method, percentile=90.0)
            expected = choose_range(values, values.amin(1), values.amax(1), scheme, method, percentile=90.0)
            assert torch.equal(lo, expected[0]) and torch.equal(hi, expected[1])
        assert (weight_range(weight, scheme, "mse")[1] < values.amax(1)).any()


@pytest.mark.parametrize("saved, loaded", [(QScheme(8, symmetric=False), QScheme(8)),
                                           (QScheme(4, symmetric=False), QScheme(8)),
                                           (QScheme(6), QScheme(8, symmetric=False))], ids=["uint8", "uint4", "int6"])
def test_a_quantizer_takes_an_unsigned_or_a_signed_grid_from_a_state_dict(saved, loaded):
    """Both ways: a uint grid ([0, 2^b-1]) saved and loaded into an int8 quantizer is read as that uint grid."""
    source, target = FakeQuantizer(saved, axis=-1, channels=1), FakeQuantizer(loaded, axis=-1, channels=1)
    source.set_range(torch.tensor(-0.3), torch.tensor(2.0))
    target.load_state_dict(source.state_dict())
    assert target.scheme == saved and target.qrange.tolist() == [saved.qmin, saved.qmax]
    x = torch.linspace(-1, 3, 101)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("tokens, bits, shift", [(16, 4, 2), (197, 4, 3), (197, 6, 4), (1000, 6, 5)])
def test_twin_uniform_fits_the_shift_with_the_least_error_and_finer_for_more_tokens(tokens, bits, shift):
    """The fine step is ``d2 / 2^m`` with ``m`` searched over 0 .. MAX_SHIFT: more tokens make smaller softmax values
    and a finer best grid (the search must reach m = 5 and beyond), the least squared error of every m."""
    from leanvit.compress.quant.quantizer import TwinUniformQuantizer

    values = (torch.randn(64, tokens, generator=torch.Generator().manual_seed(tokens)) * 1.5).softmax(-1).flatten()
    q = TwinUniformQuantizer(bits)
    q.fit(values)
    assert q.fine_step.item() == q.coarse_step * 2.0**-shift
    errors = []
    for m in range(TwinUniformQuantizer.MAX_SHIFT + 1):
        q.fine_step.fill_(q.coarse_step * 2.0**-m)
        errors.append(float((q(values) - values).pow(2).mean()))
    assert min(range(len(errors)), key=errors.__getitem__) == shift


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_mse_range_never_reaches_beyond_the_observed_extremes(bits, symmetric):
    """The searched ratio is in (0, 1]: the range is clipped, never widened past the min-max one (at 2-4 bits a wider
    one sometimes scores a lower error on the calibration values, which is no reason to spend steps on values never
    seen)."""
    from leanvit.compress.quant import choose_range

    generator = torch.Generator().manual_seed(bits)
    values = torch.rand(64, 64, generator=generator) * 2 - 0.3 - torch.rand(64, 1, generator=generator) * 0.3
    lo, hi = values.amin(1), values.amax(1)
    r_lo, r_hi = choose_range(values, lo, hi, QScheme(bits, symmetric=symmetric), "mse")
    assert (r_lo >= lo).all() and (r_hi <= hi).all()
