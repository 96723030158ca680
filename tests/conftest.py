"""Test-wide settings: run torch with CI's two threads, so thread races in kernels show up here; a tiny
untrained checkpoint for the tool tests."""

import pytest
import torch
from tool_runs import save_tiny_checkpoint

from voxsparse.ops.sparse_backend import single_thread


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """One torch thread for tests of many small products (reference detectors, parity fixtures): two
    OpenMP threads on a busy 2-core machine wait on each other (measured 15x slower), and the sparse
    backend then has no thread count to switch around spconv's CPU kernels. Results do not depend on
    it: spconv's racing kernels run single-threaded either way."""
    with single_thread():
        yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny voxelnext_small that keeps even its weakest detections (score threshold 0)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model.pth", "model.head.score_threshold=0.0")
