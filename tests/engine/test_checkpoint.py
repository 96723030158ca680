import pytest
import torch

from voxsparse.engine.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


def _checkpoint() -> Checkpoint:
    model = torch.nn.Linear(3, 2)
    return Checkpoint(model=model.state_dict(), epoch=2, step=40, config={"model": {"_target_": "x"}})


def test_round_trip(tmp_path):
    path = save_checkpoint(_checkpoint(), tmp_path / "run" / "last.pth")
    loaded = load_checkpoint(path)
    assert (loaded.epoch, loaded.step, loaded.config) == (2, 40, {"model": {"_target_": "x"}})
    assert loaded.optimizer is None
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"], "no temporary file may remain"


def test_missing_corrupt_and_foreign_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pth")
    good = save_checkpoint(_checkpoint(), tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pth: cannot be read"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign.pth: not a voxsparse checkpoint, missing fields \['model'"):
        load_checkpoint(foreign)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(_checkpoint(), tmp_path / "last.pth")
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_checkpoint(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
