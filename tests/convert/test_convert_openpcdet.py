"""voxsparse.convert.openpcdet on files written as OpenPCDet writes them: what is read, refused,
reported, and the way back (toy model: tests/convert/toy_reference.py)."""

from __future__ import annotations

import pytest
import torch
from toy_reference import (
    ToyOurs,
    ToyReference,
    as_written_by,
    randomized,
    toy_input,
    write_openpcdet_checkpoint,
)

from voxsparse.convert.openpcdet import (
    ConversionError,
    openpcdet_to_ours,
    ours_to_openpcdet,
    read_openpcdet_checkpoint,
    reference_pairs,
)


@pytest.fixture
def reference_state():
    return randomized(ToyReference()).state_dict()


def test_reads_an_openpcdet_file(tmp_path, reference_state):
    path = write_openpcdet_checkpoint(tmp_path / "ckpt.pth", reference_state)
    checkpoint = read_openpcdet_checkpoint(path)
    assert (checkpoint.epoch, checkpoint.it, checkpoint.version) == (7, 1234, "pcdet+0.6.0")
    assert checkpoint.model_state.keys() == reference_state.keys()


def test_reads_openpcdet_legacy_serialization(tmp_path, reference_state):
    """OpenPCDet saves with ``_use_new_zipfile_serialization=False``."""
    path = tmp_path / "legacy.pth"
    torch.save({"model_state": reference_state, "epoch": 1}, path, _use_new_zipfile_serialization=False)
    assert read_openpcdet_checkpoint(path).epoch == 1


class Sneaky:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("content,message", [
    ({"model_state": {}, "extra": 1}, "unexpected entry 'extra'"),
    ({"epoch": 3}, "no model_state$"),
    ({"model": {}, "config": {}, "model_state_": 1}, "no model_state.*voxsparse checkpoint"),
    ({"model_state": {"w": [1.0]}}, r"not tensors: \['w'\]"),
    ({"model_state": {}, "epoch": "3"}, "epoch is a str, expected int"),
    ([1, 2], "expected a dict, found list"),
])
def test_refuses_what_openpcdet_does_not_write(tmp_path, content, message):
    path = tmp_path / "x.pth"
    torch.save(content, path)
    with pytest.raises(ConversionError, match=message):
        read_openpcdet_checkpoint(path)


def test_refuses_pickled_objects_without_running_them(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model_state": {}, "optimizer_state": {"hook": Sneaky()}}, path)
    with pytest.raises(ConversionError, match="holds Python objects"):
        read_openpcdet_checkpoint(path)
    assert "ran" not in capsys.readouterr().out


def test_unmapped_keys_are_reported_and_missing_ones_refused(reference_state):
    state = dict(reference_state, **{"dense_head.extra.weight": torch.zeros(2)})
    _, report = openpcdet_to_ours(ToyOurs(), state)
    assert report.unmapped == ["dense_head.extra.weight"]
    assert "1 source tensors not used by the model: dense_head.extra.weight" in report.summary()
    del state["backbone_3d.bn.running_var"]
    with pytest.raises(ConversionError, match=r"1 tensors .* not in it: backbone_3d\.bn\.running_var \(ours norm\.running_var\)"):
        openpcdet_to_ours(ToyOurs(), state, where="ckpt.pth")


def test_a_shape_that_does_not_fit_is_named(reference_state):
    state = dict(reference_state)
    state["backbone_3d.bn.weight"] = torch.zeros(9)
    with pytest.raises(ConversionError, match=r"backbone_3d\.bn\.weight has shape \[9\]; norm\.weight needs \[8\]"):
        openpcdet_to_ours(ToyOurs(), state)
    state = dict(reference_state)
    state["backbone_3d.conv1.weight"] = torch.zeros(16, 3, 3, 3, 7)
    with pytest.raises(ConversionError, match=r"conv1\.weight has shape \[16, 3, 3, 3, 7\], which no spconv layout"):
        openpcdet_to_ours(ToyOurs(), state)


def test_a_model_without_reference_names_is_refused():
    with pytest.raises(ConversionError, match="Linear does not name its tensors"):
        reference_pairs(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("version", ["1.x", "2.2"])
def test_round_trip(reference_state, version):
    """OpenPCDet -> voxsparse -> OpenPCDet gives spconv 2.2's tensors, and they compute the same."""
    ours = ToyOurs().eval()
    converted, _ = openpcdet_to_ours(ours, as_written_by(reference_state, version))
    shapes = {k: v.shape for k, v in reference_state.items()}
    back = ours_to_openpcdet(ours, converted, shapes)
    assert back.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(back[key], value), key
    default_rank = ours_to_openpcdet(ours, converted)["dense_head.out.weight"]
    assert default_rank.shape == (3, 1, 1, 6) and torch.equal(default_rank.flatten(), reference_state["dense_head.out.weight"].flatten())
    reference = ToyReference().eval()
    reference.load_state_dict(back)
    ours.load_state_dict(converted)
    x = toy_input()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), ours(x), rtol=1e-5, atol=1e-5)
