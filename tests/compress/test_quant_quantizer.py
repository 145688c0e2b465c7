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
