"""The CIFAR-10 pipeline at a size a CPU cannot run (issue 14): ViT-S-wide encoders (12 blocks, width 384, 6 heads,
patch 4 at 32 px: 64 patches), all 47,500 training images after a 2,500-image validation split, batch 256, on CUDA.

    python bench/gpu_pipeline.py --calibrate     # one epoch of each stage of setting (a): seconds per epoch
    python bench/gpu_pipeline.py --teacher-epochs 7 --distill-epochs 5 --finetune-epochs 5 --student half
    python -c "from kdnb.pipeline import export_results; export_results('runs/cifar10-gpu', 'results/cifar10_gpu')"

The data folder is the repository's `../shared/data/cifar10` (CIFAR-10's training images as JPEGs).
"""
import argparse
import json
from pathlib import Path

from kdnb.kinds import PipelineConfig
from kdnb.pipeline import run_pipeline


def config(teacher_epochs=40, distill_epochs=20, probe_epochs=10, finetune_epochs=15, out_dir="runs/cifar10-gpu",
           **kw) -> PipelineConfig:
    return PipelineConfig(dataset="cifar10", data_root="../shared/data/cifar10", val_size=2500, train_subset=None,
                          img_size=32, patch_size=4, embed_dim=384, num_heads=6, teacher_depth=12,
                          teacher_epochs=teacher_epochs, distill_epochs=distill_epochs, probe_epochs=probe_epochs,
                          finetune_epochs=finetune_epochs, batch_size=256, pretrain_lr=1.5e-3, distill_lr=1.5e-3,
                          probe_lr=1e-2, finetune_lr=2e-3, clone_batch=4, device="cuda", out_dir=out_dir, **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--distill-epochs", type=int, default=20)
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--student", default="both", choices=["half", "other", "both"])
    ap.add_argument("--out-dir", default="runs/cifar10-gpu")
    a = ap.parse_args(argv)
    if a.calibrate:
        cfg = config(1, 1, 1, 1, out_dir=a.out_dir + "-calibrate", student="half")
        run_pipeline(cfg)
        times = {p.parent.name: {k: json.loads(p.read_text()).get(k) for k in ("train_time_s", "wall_time_s",
                                                                               "images_per_s")}
                 for p in sorted(Path(cfg.out_dir).glob("*/summary.json"))}
        print("CALIBRATION", json.dumps(times))
        return
    print(run_pipeline(config(a.teacher_epochs, a.distill_epochs, a.probe_epochs, a.finetune_epochs, a.out_dir,
                                student=a.student)))


if __name__ == "__main__":
    main()
