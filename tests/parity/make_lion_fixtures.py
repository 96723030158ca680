"""Write LION's backbone parity fixtures (tests/parity/fixtures/lion_*.pt) from the authors' checkout.

    python -m tests.parity.make_lion_fixtures --lion /path/to/LION

For each operator (Mamba, RetNet, RWKV) the reference ``LION3DBackboneOneStride`` (loaded by path,
``voxsparse.benchmark.lion_reference``) is built at 16 channels on a 40 x 40 x 32 grid, with the
reference's four stages, windows (13, 13, 32 / 16 / 8 / 4), small groups (64, 48, 32, 16) so that
frames span several groups, voxel generation and shifted windows (Mamba with 8 states, RetNet and
RWKV with 2 heads). Its random weights get random LayerNorm affines and BatchNorm statistics, and RWKV
blocks random mixing, decay and branch scales (their initial values are ~1e-4 or ~1e-5, under which a
block's contribution would hardly show); it runs on two
frames of random voxels (1,200 and 250 draws), in evaluation and in training mode (no stochastic
depth). ``lion_<operator>.pt`` holds the
config, the state dict, the input and, per mode, the output voxels (indices and features);
``lion_<operator>_stages.pt`` the voxels after each merge between stages (evaluation mode), so each
stage can be checked from the reference's own input (the RWKV fixture keeps the weights of the first
stage and the last layer only: :data:`KEEP`). tests/models/test_lion.py loads the state dict
into ``LIONBackbone`` and compares.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from voxsparse.benchmark.lion_reference import build_lion_backbone, run_lion_backbone

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MAX_BYTES = 2 * 1024 * 1024
GRID = (40, 40, 32)  # x, y, z voxels
OPERATORS = {
    "mamba": {"NAME": "Mamba", "CFG": {"d_state": 8, "d_conv": 4, "expand": 2, "drop_path": 0.0}},
    "retnet": {"NAME": "RetNet", "CFG": {"mode": "chunk", "n_head": 2, "expand_k": 1, "expand_v": 2,
                                         "hidden_rate": 4, "used_MLP": True, "with_cp": True, "drop_path": 0.0}},
    "rwkv": {"NAME": "RWKV", "CFG": {"n_head": 2, "shift_pixel": 1, "shift_mode": "time_shift", "hidden_rate": 4,
                                     "drop_path": 0.0, "init_mode": "fancy", "with_cp": True, "init_values": 1e-5}},
}


def backbone_config(operator: dict) -> dict:
    """The reduced ``BACKBONE_3D`` config of the fixtures."""
    return {
        "NAME": "LION3DBackboneOneStride", "FEATURE_DIM": 16, "LAYER_DIM": [16] * 4, "NUM_LAYERS": 4,
        "DEPTHS": [2] * 4, "LAYER_DOWN_SCALES": [[[2, 2, 2], [2, 2, 2]]] * 4,
        "WINDOW_SHAPE": [[13, 13, 32], [13, 13, 16], [13, 13, 8], [13, 13, 4]], "GROUP_SIZE": [64, 48, 32, 16],
        "DIRECTION": ["x", "y"], "DIFF_SCALE": 0.2, "DIFFUSION": True, "SHIFT": True, "OPERATOR": operator,
    }


#: State-dict prefixes a fixture keeps (all when absent). RWKV blocks carry ~11k parameters each at 16
#: channels (their low-rank mixing projections have fixed ranks), which for all 36 blocks would pass
#: MAX_BYTES; the first stage (whose first block has ``ln0``) and the last layer show the operator, the
#: layers around it are the Mamba and RetNet fixtures'.
KEEP = {"rwkv": ("linear_1.", "dow1.", "linear_out.")}


def random_voxels(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, 4) int32 unique (b, z, y, x) voxels of two frames and (M, 16) features."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = GRID
    frames = [torch.stack([torch.full((n,), b), torch.randint(0, z, (n,), generator=g),
                           torch.randint(0, y, (n,), generator=g), torch.randint(0, x, (n,), generator=g)], 1)
              for b, n in ((0, 1200), (1, 250))]
    coords = torch.unique(torch.cat(frames), dim=0).int()
    return coords, torch.randn(len(coords), 16, generator=g)


def randomize(model: torch.nn.Module, seed: int = 2) -> None:
    """Random LayerNorm / BatchNorm affines and BatchNorm statistics (the rest is the reference's init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
    g = torch.Generator().manual_seed(seed + 1)  # RWKV's own parameters (other operators have none)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma1", "gamma2"):
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=g))
            elif leaf in ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2"):  # low-rank projections
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
            elif leaf in ("time_decay", "time_faaaa") or leaf.startswith(("time_maa_", "spatial_mix_")):
                param.add_(0.2 * torch.randn(param.shape, generator=g))
            elif ".ln_x." in name:
                param.copy_((1 if leaf == "weight" else 0) + 0.2 * torch.randn(param.shape, generator=g))


def make(lion: Path, name: str) -> list[Path]:
    torch.manual_seed(0)
    config = backbone_config(OPERATORS[name])
    model = build_lion_backbone(lion, copy.deepcopy(config), 16, GRID)
    randomize(model)
    coords, features = random_voxels()
    state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(KEEP.get(name, ""))}
    record = {"config": config, "grid": list(GRID), "batch_size": 2, "coords": coords, "features": features,
              "state_dict": state}
    stages: list[dict] = []

    def keep(module, args, output):  # dowS returns (voxels, inverse); linear_out later overwrites dow4's features
        stages.append({"indices": output[0].indices.to(torch.int16), "features": output[0].features.clone()})

    hooks = [getattr(model, f"dow{i}").register_forward_hook(keep) for i in range(1, 5)]
    for mode in ("eval", "train"):
        model.train(mode == "train")
        stages.clear()
        with torch.no_grad():
            out = run_lion_backbone(model, coords.clone(), features.clone(), 2)
        record[mode] = {"indices": out.indices.int().clone(), "features": out.features.clone()}
        if mode == "eval":
            stage_record = {"stages": list(stages)}
    for hook in hooks:
        hook.remove()
    paths = [FIXTURES / f"lion_{name}.pt", FIXTURES / f"lion_{name}_stages.pt"]
    for path, data in zip(paths, (record, stage_record)):
        torch.save(data, path)
        if path.stat().st_size > MAX_BYTES:
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes, over {MAX_BYTES}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lion", type=Path, required=True, help="a checkout of happinesslz/LION")
    parser.add_argument("--operators", nargs="*", default=sorted(OPERATORS), choices=sorted(OPERATORS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.operators:
        for path in make(args.lion, name):
            print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
