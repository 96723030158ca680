"""voxsparse.convert.spconv_layout: layouts inferred from shapes, refused when mixed or undecidable,
and converted weights computing what each spconv version computed (toy model, spconv 2.3.8)."""

from __future__ import annotations

import pytest
import torch
from toy_reference import ToyOurs, ToyReference, as_written_by, randomized, toy_input

from voxsparse.convert.openpcdet import openpcdet_to_ours
from voxsparse.convert.spconv_layout import (
    ConvWeight,
    LayoutError,
    SpconvLayout,
    infer_layout,
    linear_to_spconv,
    stored_shape,
    to_linear,
)


def _weight(key, version, cout, kernel, cin):
    return ConvWeight(key, stored_shape(SpconvLayout(version), cout, kernel, cin), cout, kernel, cin)


@pytest.mark.parametrize("version", ["1.x", "2.0", "2.2"])
def test_infer_layout_from_non_square_weights(version):
    weights = [_weight("a", version, 16, (3, 3, 3), 8), _weight("b", version, 16, (3, 3, 3), 16)]
    assert infer_layout(weights) is SpconvLayout(version)


def test_spconv21_mixes_layouts_by_kernel_size():
    weights = [_weight("big", "2.1", 8, (5, 5, 5), 4), _weight("small", "2.1", 16, (3, 3, 3), 8)]
    assert weights[0].shape == (5, 5, 5, 8, 4) and weights[1].shape == (16, 3, 3, 3, 8)
    assert infer_layout(weights) is SpconvLayout.V2_1
    # Without a kernel over 32 cells, 2.1 and 2.2 store and compute alike: the newest is named.
    assert infer_layout(weights[1:]) is SpconvLayout.V2_2


def test_square_only_file_is_refused_naming_its_keys():
    weights = [_weight(f"backbone_3d.conv{i}.weight", "1.x", 16, (3, 3, 3), 16) for i in range(6)]
    with pytest.raises(LayoutError, match=r"2\.0 and 1\.x.*backbone_3d\.conv0\.weight.*and 2 more.*state the spconv"):
        infer_layout(weights, "ckpt.pth")


def test_mixed_file_is_refused():
    weights = [_weight("old", "1.x", 16, (3, 3, 3), 8), _weight("new", "2.2", 16, (3, 3, 3), 8)]
    with pytest.raises(LayoutError, match="different spconv layouts.*1.x: old.*2.2: new"):
        infer_layout(weights)


def test_a_shape_no_layout_gives_is_named():
    with pytest.raises(LayoutError, match=r"w has shape \[3, 3, 3, 9, 9\]"):
        infer_layout([ConvWeight("w", (3, 3, 3, 9, 9), 16, (3, 3, 3), 8)])


def test_one_cell_weights_are_read_as_spconv_multiplied():
    """spconv computed ``x @ W.view(Cin, Cout)``: the linear weight is that matrix transposed, not
    the (Cout, Cin) the 2.2 shape suggests."""
    stored = torch.arange(12.0).reshape(3, 1, 1, 4)  # Cout 3, Cin 4, spconv 2.2
    x = torch.randn(5, 4)
    linear = to_linear(stored, ConvWeight("w", (3, 1, 1, 4), 3, (1, 1), 4))
    torch.testing.assert_close(x @ linear.t(), x @ stored.view(4, 3))
    assert not torch.equal(linear, stored.view(3, 4))
    assert torch.equal(linear_to_spconv(linear, 2), stored)


@pytest.mark.parametrize("version", ["1.x", "2.0", "2.1", "2.2"])
def test_converted_toy_computes_what_the_source_computed(version):
    reference = randomized(ToyReference())
    x = toy_input()
    with torch.no_grad():
        expected = reference(x)
    state = as_written_by(reference.state_dict(), version)
    ours = ToyOurs().eval()
    converted, report = openpcdet_to_ours(ours, state)
    assert report.layout is (SpconvLayout.V2_2 if version == "2.2" else SpconvLayout(version))
    assert report.ignored == ["global_step"] and report.unmapped == [] and report.converted == len(converted)
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
