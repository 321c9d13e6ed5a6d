"""Every preset runs end to end on CPU at small size: the seeds' optimiser, schedule and augmentation
values are kept, only the model, image size, data and step count are shrunk."""
import json
import math

import pytest

from kdnb.config import PRESETS, DistillConfig, get_config, load_config
from kdnb.distill import distill
from kdnb.finetune import finetune

SMALL = dict(dataset="digits", img_size=16, patch_size=4, embed_dim=32, num_heads=2, batch_size=8, max_steps=2,
             train_subset=64, device="cpu", precision="fp32", num_workers=0, tensorboard=False, log_every=1)


def shrink(name, out):
    cfg = get_config(name)
    if isinstance(cfg, DistillConfig):
        return cfg.replace(**SMALL, mlp_dim=64, student_depth=1, teacher="tiny", teacher_checkpoint=None,
                           student_checkpoint=None, out_dir=str(out))
    return cfg.replace(**SMALL, model="tiny", checkpoint=None, depth=1, out_dir=str(out))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_end_to_end(name, tmp_path):
    cfg = shrink(name, tmp_path / name)
    summary = (distill if isinstance(cfg, DistillConfig) else finetune)(cfg)
    assert summary["steps"] == 2 and summary["finished"]
    saved = load_config(tmp_path / name / "config.yaml")
    seed = get_config(name)
    for field in ("lr", "adam_eps", "betas", "weight_decay", "warmup_frac", "warmup_steps", "schedule"):
        assert getattr(saved, field) == getattr(seed, field), field  # the seed's values ran, not defaults
    losses = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "step"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_bf16_autocast_on_cpu(tmp_path):
    "precision='bf16' runs under CPU autocast when asked; the loss stays finite."
    cfg = shrink("distill_cpu", tmp_path / "bf16").replace(precision="bf16")
    s = distill(cfg)
    assert s["precision"] == "bf16" and math.isfinite(s["metrics"]["val_loss"])


@pytest.mark.slow
def test_torch_compile_computes_the_same_losses(tmp_path):
    "compile=True (inductor on CPU) gives the eager losses to 1e-4 relative."
    eager = shrink("distill_cpu", tmp_path / "eager").replace(max_steps=3)
    compiled = eager.replace(compile=True, out_dir=str(tmp_path / "compiled"))
    losses = []
    for cfg in (eager, compiled):
        distill(cfg)
        losses.append([json.loads(l)["loss"] for l in (tmp_path / cfg.out_dir.split("/")[-1] / "metrics.jsonl").read_text().splitlines()
                       if json.loads(l)["kind"] == "step"])
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(*losses)), losses
