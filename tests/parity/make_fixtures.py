"""Write the whole-model parity fixtures of tests/parity/fixtures/ from the reference checkouts.

    python -m tests.parity.make_fixtures --openpcdet /path/to/OpenPCDet --dsvt /path/to/DSVT [--configs NAME ...]

For each reference config (``voxsparse.benchmark.parity.REFERENCE_CONFIGS``; ``--configs`` picks
some) the reference detector is built from its checkout at reduced width with random weights and
random BatchNorm statistics, and run on a synthetic frame (part of its points, plus points in the
top voxel layer, and its labelled boxes). The fixture ``<name>.pt`` (at most 2 MB, plain tensors,
lists, dicts, strings and floats) holds: the reference state dict, the input points (voxsparse's
point convention), the boxes both ways, and the record of what the reference computed
(``voxsparse.benchmark.parity.reference_record``: every stage, the decoded boxes, the training
loss). tests/parity/test_fixtures.py converts the state dict, runs voxsparse and compares.

Weights of 4096 values or more are drawn from the four levels (-3, -1, 1, 3) x a power-of-two step
(their spread about 1/sqrt(fan-in)), so they are stored exactly in 2 bits; stages of many values
keep all coordinates, 192 sampled rows and column sums; the reference's points are stored only
where they differ from ours.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from voxsparse.benchmark.openpcdet import build_reference
from voxsparse.benchmark.parity import (
    REFERENCE_CONFIGS,
    ParityInput,
    parity_input,
    randomize_batchnorm,
    reference_record,
    shrink_rows,
)
from voxsparse.convert.openpcdet import model_config, model_from_config, openpcdet_to_ours

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MAX_BYTES = 2 * 1024 * 1024
#: Tensors of at least this many values are stored in 4 bits.
PACKED_MIN = 4096
#: Points kept of the synthetic frame.
POINTS = 6000


def quantize_large_weights(module: torch.nn.Module, seed: int) -> None:
    """Floating parameters of at least :data:`PACKED_MIN` values become ``(2 k - 3) * step``, k in
    0..3, with a power-of-two ``step`` near 1 / (2.24 sqrt(fan-in)) (fan-in: values per output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.is_floating_point() and parameter.numel() >= PACKED_MIN:
                fan_in = parameter.numel() // parameter.shape[0]
                step = 2.0 ** round(math.log2(1.0 / (2.24 * math.sqrt(fan_in))))
                codes = torch.randint(0, 4, parameter.shape, generator=gen)
                parameter.copy_((2 * codes - 3).to(parameter.dtype) * step)


def pack(state: dict[str, torch.Tensor]) -> dict:
    """Large tensors as ``{"codes": uint8 (ceil(n / 4),), "shape", "step"}`` (four 2-bit codes a
    byte, value = (2 code - 3) step), the rest as they are."""
    out = {}
    for key, value in state.items():
        if value.is_floating_point() and value.numel() >= PACKED_MIN:
            step = float(value.abs().min())
            codes = ((value.flatten() / step).round().to(torch.int64) + 3) // 2
            assert torch.equal((2 * codes - 3).to(value.dtype) * step, value.flatten()), key
            codes = torch.cat([codes, codes.new_zeros(-len(codes) % 4)]).to(torch.uint8).reshape(-1, 4)
            packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
            out[key] = {"codes": packed, "shape": list(value.shape), "step": step}
        else:
            out[key] = value.clone()
    return out


def make_fixture(name: str, root: Path, seed: int = 0) -> dict:
    spec = REFERENCE_CONFIGS[name]
    torch.manual_seed(seed)
    reference = build_reference(root, spec.yaml, spec.reduced)
    randomize_batchnorm(reference, seed)
    quantize_large_weights(reference, seed)
    reference.eval()
    model = model_from_config(model_config(name, None, spec.ours_reduced))
    state, _ = openpcdet_to_ours(model, reference.state_dict())
    model.load_state_dict(state)
    inputs = parity_input(model, reference, seed=seed, max_points=POINTS)
    reference_state = pack(reference.state_dict())  # before training mode moves its BatchNorm statistics
    record = reference_record(reference, inputs)
    record["stages"] = {k: shrink_rows(v, samples=192, seed=seed) for k, v in record["stages"].items()}
    return fixture_entry(name, spec.ours_reduced, f"{spec.checkout} {spec.yaml}", spec.reduced, reference_state, inputs, record)


def fixture_entry(config: str, ours_overrides, reference: str, reference_overrides: dict, state: dict,
                  inputs: ParityInput, record: dict) -> dict:
    """What a parity fixture file holds: the config and its reduced overrides, the reference's name,
    overrides and packed state, the inputs both sides saw, and the reference's record."""
    return {
        "config": config,
        "ours_overrides": list(ours_overrides),
        "reference": reference,
        "reference_overrides": dict(reference_overrides),
        "state": state,
        "points": inputs.points,
        "reference_points": None if torch.equal(inputs.points, inputs.reference_points) else inputs.reference_points,
        "gt_boxes": inputs.gt_boxes,
        "boxes": inputs.annotations.boxes.tensor,
        "labels": inputs.annotations.labels,
        "record": record,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--openpcdet", type=Path, required=True, help="OpenPCDet checkout (8caccce)")
    parser.add_argument("--dsvt", type=Path, help="the DSVT repository (for dsvt_pillar_nuscenes)")
    parser.add_argument("--configs", nargs="*", default=sorted(REFERENCE_CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    FIXTURES.mkdir(exist_ok=True)
    for name in args.configs:
        root = args.dsvt if REFERENCE_CONFIGS[name].checkout == "DSVT" else args.openpcdet
        if root is None:
            print(f"{name}: skipped (needs --dsvt)")
            continue
        path = FIXTURES / f"{name}.pt"
        torch.save(make_fixture(name, root), path)
        size = path.stat().st_size
        print(f"{name}: {path} {size / 1e6:.2f} MB")
        if size > MAX_BYTES:
            raise SystemExit(f"{path} is larger than {MAX_BYTES} bytes")


if __name__ == "__main__":
    main()
