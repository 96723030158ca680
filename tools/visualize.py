"""Show or render LiDAR frames with ground truth and predictions.

    python tools/visualize.py                       # synthetic val frame 0: a window, or a PNG when headless
    python tools/visualize.py checkpoint=outputs/voxelnext_small/<run>/last.pth camera=chase \
        png_colors=128 output=docs/images/synthetic_predictions.png    # the README image
    python tools/visualize.py predictions=outputs/eval/<run>/predictions.pt frame=3 camera=bev
    python tools/visualize.py points=scan.bin camera=orbit      # a point file (.bin .npy .pcd .ply)
    python tools/visualize.py points=n015...LIDAR_TOP....pcd.bin checkpoint=... format=nuscenes
    python tools/visualize.py num_frames=20 +dataset.val.sequence_length=20 camera=orbit output=seq.mp4
                                                                # a sequence with track trails (or .gif)
    python tools/visualize.py checkpoint=... track=true num_frames=20 +dataset.val.sequence_length=20 \
        output=tracks.gif                                       # trails of the tracker's tracks

Headless (no DISPLAY) it renders with Open3D's offscreen renderer on the CPU (Vulkan lavapipe;
Debian packages libusb-1.0-0 libvulkan1 mesa-vulkan-drivers), or, where that cannot run, draws a
matplotlib bird's-eye view. See configs/visualize.yaml for every option.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from voxsparse.engine.cli import tool
from voxsparse.engine.config import check_types, parse_options
from voxsparse.viz.app import VisualizeOptions, run


@tool("visualize")
def main(cfg: DictConfig) -> None:
    opts = parse_options(cfg, VisualizeOptions)
    dataset = cfg.get("dataset")  # optional: points=FILE needs none
    if dataset is not None:
        check_types(dataset, "dataset")
    run(opts, dataset, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
