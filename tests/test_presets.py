"""Every preset runs end to end on CPU at small size: the seeds' optimiser, schedule and augmentation
values are kept, only the model, image size, data and step count are shrunk."""
import json
import math

import pytest

from pathlib import Path

from kdnb.config import PRESETS, DistillBase, GlueConfig, PretrainConfig, TextDistillConfig, get_config, load_config
from kdnb.kinds import FKDConfig
from kdnb.runs import run  # imports every objective, so PRESETS holds their presets too
from kdnb.distill import distill
from kdnb.kinds import PipelineConfig
from kdnb.pipeline import stage_configs
from kdnb.kinds import SegmentConfig

GLUE_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "glue"

SMALL = dict(dataset="digits", img_size=16, patch_size=4, embed_dim=32, num_heads=2, batch_size=8, max_steps=2,
             train_subset=64, device="cpu", precision="fp32", num_workers=0, tensorboard=False, log_every=1)


TEXT = dict(batch_size=8, max_steps=2, max_len=16, device="cpu", precision="fp32", num_workers=0, tensorboard=False,
            log_every=1, data_root=str(GLUE_ROOT))


def shrink(name, out):
    cfg = get_config(name)
    if isinstance(cfg, TextDistillConfig):  # the offline MiniLM instead of bert-base-uncased
        return cfg.replace(**TEXT, teacher="minilm", student_layers=1, sentence_tasks="rte", max_sentences=64, val_size=16,
                           out_dir=str(out))
    if isinstance(cfg, GlueConfig):
        return cfg.replace(**TEXT, checkpoint="minilm", layers=1, dataset="rte", train_subset=64, out_dir=str(out))
    if isinstance(cfg, DistillBase):  # every objective; FKD presets: a few stored crops at the student's size
        fkd = dict(label_crops=8, label_img_size=None) if isinstance(cfg, FKDConfig) else {}
        return cfg.replace(**SMALL, mlp_dim=64, depth=1, teacher="tiny", teacher_pretrained=False,
                           teacher_checkpoint=None, pretrained=False, checkpoint=None, out_dir=str(out), **fkd)
    if isinstance(cfg, PretrainConfig):  # a 2-block encoder and a small decoder; masking, EMA and loss as preset
        return cfg.replace(**SMALL, pretrained=False, checkpoint=None, depth=2, prenet_depth=0, average_top_k_layers=2,
                           clone_batch=2, decoder_dim=16, decoder_groups=4, decoder_layers=2, out_dir=str(out))
    if isinstance(cfg, SegmentConfig):  # four blocks (one per UperNet scale) on a few in-memory digit scenes
        return cfg.replace(**{**SMALL, "dataset": "digit_scenes"}, scenes=80, model="tiny", pretrained=False,
                           checkpoint=None, depth=4, decoder_channels=16, out_dir=str(out))
    return cfg.replace(**SMALL, model="tiny", pretrained=False, checkpoint=None, depth=1, out_dir=str(out))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_end_to_end(name, tmp_path):
    if isinstance(get_config(name), PipelineConfig):  # its miniature runs in nbs/18_pipeline.ipynb
        stages = stage_configs(get_config(name, out_dir=str(tmp_path)))  # every stage's config builds and validates
        assert all(c.out_dir.startswith(str(tmp_path)) for c in stages.values())
        return
    cfg = shrink(name, tmp_path / name)
    if isinstance(cfg, (TextDistillConfig, GlueConfig)) and not (GLUE_ROOT / "RTE").is_dir():
        pytest.skip("../shared/data/glue is not here")
    summary = run(cfg)  # the task's runner, as the CLI and the run notebooks pick it
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
