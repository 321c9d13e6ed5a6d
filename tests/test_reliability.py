"""Faults a user meets, and what kdnb must do: never lose data, never pass silently, and answer each mistake with
one message that names the file, field, folder or task and the fix. One test per fault class (issue 12); each failed
on the code before it. The table of classes is on the engine page ("Faults and what kdnb does")."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdnb.cli import main
from kdnb.config import ConfigError
from kdnb.config import get_config, params_from_namespace
from kdnb.data import SplitDataset
from kdnb.distill import DistillTask, build_student, build_teacher
from kdnb.engine import Callback, NonFiniteLoss, fit_task
import kdnb.runs  # registers every objective
from kdnb.distill import distill

TINY = dict(train_subset=64, batch_size=16, tensorboard=False, num_workers=0, log_every=1, device="cpu")


def cfg_of(out, **kw):
    return get_config("distill_cpu", out_dir=str(out), **{**TINY, **kw})


class Script(Callback):
    "Replace the validation metric by a scripted value per epoch (to make `best` move as the test wants)."
    def __init__(self, values): self.values = values
    def after_eval(self, t): t.metrics["val_loss"] = self.values[t.epoch - 1]


class KillAt(Callback):
    def __init__(self, step): self.step = step
    def after_step(self, t):
        if t.step == self.step: raise KeyboardInterrupt("killed")


def write_imagefolder(root, splits=("train", "val"), n=8, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def no_nan_json(path):
    "json.loads that refuses the bare NaN/Infinity that json.dumps writes by default."
    def refuse(c): raise ValueError(f"{path} holds {c}: not valid JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- data lost

def test_resume_never_replaces_best_with_a_worse_checkpoint(tmp_path):
    "Epoch scores 1.0, 0.5, 0.8 (lower is better); killed in epoch 3 and resumed: `best` stays the epoch-2 one."
    cfg = cfg_of(tmp_path / "r", epochs=3)
    with pytest.raises(KeyboardInterrupt): distill(cfg, callbacks=[Script([1.0, 0.5, 0.8]), KillAt(10)])
    distill(cfg.replace(resume=True), callbacks=[Script([1.0, 0.5, 0.8])])
    best = torch.load(tmp_path / "r" / "checkpoints" / "best" / "state.pt", weights_only=True)
    assert (best["epoch"], best["best"]) == (2, 0.5)
    assert no_nan_json(tmp_path / "r" / "summary.json")["best"] == {"val_loss": 0.5}


def test_resuming_a_finished_run_keeps_its_summary(tmp_path):
    cfg = cfg_of(tmp_path / "f", epochs=1)
    first = distill(cfg)
    again = distill(cfg.replace(resume=True))
    for k in ("metrics", "best", "steps", "finished"):
        assert again[k] == first[k], k
    assert first["metrics"]["val_loss"] > 0


# ---------------------------------------------------------------- silent wrong behaviour

def test_a_crash_in_evaluation_leaves_the_run_unfinished(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    bad = root / "val" / "a" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated JPEG
    cfg = cfg_of(tmp_path / "run", dataset="imagefolder", data_root=str(root), epochs=1, train_subset=None)
    with pytest.raises(OSError, match="0.jpg cannot be read"): distill(cfg)
    s = no_nan_json(tmp_path / "run" / "summary.json")
    assert s["finished"] is False and "0.jpg" in s["error"]
    s = distill(cfg.replace(out_dir=str(tmp_path / "skip"), skip_bad_images=True))  # or skip it, counted
    assert s["finished"] and s["skipped_images"] == 1


def test_resume_refuses_a_changed_config_and_names_the_fields(tmp_path):
    cfg = cfg_of(tmp_path / "c", epochs=2, ckpt_every=2)
    with pytest.raises(KeyboardInterrupt): distill(cfg, callbacks=[KillAt(3)])
    with pytest.raises(ConfigError, match=r"lr: 0.001 -> 0.002.*seed: 0 -> 1"):
        distill(cfg.replace(resume=True, lr=2e-3, seed=1))
    with pytest.raises(ConfigError, match="embed_dim"):  # a changed architecture: the field, not a size mismatch
        distill(cfg.replace(resume=True, embed_dim=32, num_heads=2, mlp_dim=128))
    s = distill(cfg.replace(resume=True, epochs=3))  # training may grow
    assert s["finished"] and s["epochs"] == 3


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path):
    cfg = cfg_of(tmp_path / "c", epochs=2, ckpt_every=2)
    with pytest.raises(KeyboardInterrupt): distill(cfg, callbacks=[KillAt(3)])
    assert distill(cfg.replace(resume=True, lr=2e-3, resume_changes="lr"))["finished"]


def test_resume_needs_a_checkpoint_to_continue(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nothing to continue"):
        distill(cfg_of(tmp_path / "nowhere", resume=True))
    assert main(["distill", "--preset", "distill_cpu", "--resume", "true"]) == 2  # without out_dir: which run?
    assert "resume=True needs out_dir" in capsys.readouterr().err


def test_a_new_run_never_appends_to_an_earlier_runs_metrics(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    with pytest.raises(FileExistsError, match="stopped before its first checkpoint"): distill(cfg_of(tmp_path / "m"))
    assert (tmp_path / "m" / "metrics.jsonl").read_text().count("\n") == 1


class Tensors(Dataset):
    "Random images [3, 16, 16]; image `nan_at` holds a NaN pixel."
    def __init__(self, n, nan_at=None):
        g = torch.Generator().manual_seed(0)
        self.x, self.targets, self.nan_at = torch.randn(n, 3, 16, 16, generator=g), [0] * n, nan_at
        if nan_at is not None: self.x[nan_at, 0, 0, 0] = float("nan")
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], 0


def test_non_finite_data_is_named_as_such(tmp_path):
    cfg = cfg_of(tmp_path / "v", epochs=1)
    def task():
        torch.manual_seed(0)
        return DistillTask(build_student(cfg), build_teacher(cfg))
    with pytest.raises(NonFiniteLoss, match="validation metrics"):  # NaN in the validation data
        fit_task(task(), cfg, SplitDataset(Tensors(32)), SplitDataset(Tensors(16, nan_at=3)))
    s = no_nan_json(tmp_path / "v" / "summary.json")
    assert s["finished"] is False and "validation" in s["error"]
    with pytest.raises(NonFiniteLoss, match="holds NaN or Inf values: the data"):  # NaN in the training data
        fit_task(task(), cfg.replace(out_dir=str(tmp_path / "t")), SplitDataset(Tensors(32, nan_at=5)))


def test_a_label_store_knows_its_teachers_weights():
    from kdnb.fkd import ClassifierTeacher, store_meta
    from kdnb.models import Classifier, tiny_data2vec2
    cfg = get_config("ferkd_cpu")
    ds = SplitDataset(Tensors(8))
    torch.manual_seed(0); a = ClassifierTeacher(Classifier(tiny_data2vec2(), 10), 16)
    torch.manual_seed(1); b = ClassifierTeacher(Classifier(tiny_data2vec2(), 10), 16)  # "retrained": same name
    ma, mb = store_meta(cfg, a, ds, 10), store_meta(cfg, b, ds, 10)
    assert ma["teacher"] == mb["teacher"] and ma["teacher_weights"] != mb["teacher_weights"]


def test_report_only_names_an_unknown_page(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path), "--only", "nosuchpage", "--no-execute"]) == 2
    out = capsys.readouterr()
    assert "no report page nosuchpage" in out.err and "open " not in out.out


# ---------------------------------------------------------------- one clear message

def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("flags, exit_code, says", [
    (["--lr", "nan"], 2, "lr=nan must be a finite number"),
    (["--train_subset", "0"], 2, "train_subset=0 must be > 0"),
    (["--config", "/nonexistent/c.yaml"], 2, "no config file at /nonexistent/c.yaml"),
])
def test_cli_input_errors(flags, exit_code, says, capsys):
    assert main(["distill", "--preset", "distill_cpu"] + flags) == exit_code
    assert says in one_line(capsys)


def test_cli_file_and_folder_errors_are_one_line(tmp_path, capsys):
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text("model: vit\nlr: 1\n")
    assert main(["distill", "--config", str(foreign)]) == 2
    assert "was not written by kdnb" in one_line(capsys)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    args = ["distill", "--preset", "distill_cpu", "--dataset", "imagefolder", "--data_root", str(empty), "--out_dir",
            str(tmp_path / "r1")]
    assert main(args) == 1
    assert f"{empty / 'train'} is not a usable ImageFolder" in one_line(capsys)
    (tmp_path / "afile").write_text("")
    assert main(["distill", "--preset", "distill_cpu", "--out_dir", str(tmp_path / "afile" / "run")]) == 1
    assert "cannot write the run folder" in one_line(capsys)
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    assert main(["finetune", "--preset", "finetune_cpu", "--model", "data2vec2", "--checkpoint",
                 str(tmp_path / "random.pt"), "--out_dir", str(tmp_path / "r2")]) == 1
    assert "random.pt is not a readable PyTorch checkpoint" in one_line(capsys)
    with pytest.raises(ValueError):  # --debug: the traceback
        main(["finetune", "--preset", "finetune_cpu", "--model", "data2vec2", "--checkpoint", str(tmp_path / "random.pt"),
              "--out_dir", str(tmp_path / "r3"), "--debug"])


def test_a_text_run_given_to_image_finetuning(tmp_path, capsys):
    from kdnb.weights import save_weights
    class TextEncoder(torch.nn.Module):  # what a kdnb text run saves (its backbone class)
        def __init__(self): super().__init__(); self.lin = torch.nn.Linear(2, 2); self.arch = {"source": "minilm"}
    (tmp_path / "text" / "checkpoints" / "last").mkdir(parents=True)
    save_weights(TextEncoder(), tmp_path / "text" / "checkpoints" / "last" / "model.safetensors")
    assert main(["finetune", "--preset", "finetune_cpu", "--checkpoint", str(tmp_path / "text"),
                 "--out_dir", str(tmp_path / "ft")]) == 1
    assert "not an image encoder (Data2Vec2Encoder, TimmEncoder)" in one_line(capsys)


def test_glue_files_that_are_not_tab_separated(tmp_path):
    from kdnb.text import read_glue
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index,sentence1,sentence2,label\n0,A dog.,An animal.,entailment\n")
    with pytest.raises(ValueError, match=r"RTE/train.tsv: none of its 1 rows is a valid RTE row"):
        read_glue(tmp_path, "rte", "train")


def test_pipeline_parameters_refuse_a_training_runs_fields():
    "`lr` is a field of the training runs, not of the pipeline (it has one lr per stage): refused, naming it."
    from kdnb.kinds import PipelineConfig
    with pytest.raises(ConfigError, match="'lr'"):
        params_from_namespace({"lr": 1e-3}, set(), PipelineConfig)
    assert params_from_namespace({"preset": "evidence_cifar10"}, set(), PipelineConfig) == {"preset": "evidence_cifar10"}


def test_every_weights_reading_error_names_the_file(tmp_path):
    "A kdnb weights file without one key: backbone, classifier and resume each name the file (not a bare key list)."
    from safetensors.torch import save_file
    from safetensors import safe_open
    from kdnb.weights import load_backbone, load_classifier
    from kdnb.finetune import finetune
    run = tmp_path / "ft"
    cfg = get_config("finetune_cpu", out_dir=str(run), max_steps=2, train_subset=64, tensorboard=False)
    finetune(cfg)
    w = run / "checkpoints" / "last" / "model.safetensors"
    with safe_open(str(w), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in state if k.endswith("blocks.1.mlp.fc2.weight"))
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in state.items() if k != key}, str(bad), metadata=meta)
    for load in (load_backbone, load_classifier):
        with pytest.raises(KeyError, match=f"{bad}.*blocks.1.mlp.fc2.weight"): load(bad)
    save_file({k: v for k, v in state.items() if k != key}, str(w), metadata=meta)  # the run's own checkpoint
    with pytest.raises(KeyError, match="last/model.safetensors does not fit"):
        finetune(cfg.replace(resume=True, max_steps=3))


def test_two_processes_in_one_run_folder(tmp_path, capsys):
    """The issue's case: a run folder held by another process (a requeued job while the old one runs). The second
    `kdnb distill --resume auto` stops at once with one line naming the folder and its holder, and touches nothing."""
    import subprocess
    import sys
    out = tmp_path / "run"
    code = (f"from kdnb.engine import FolderLock; import time; FolderLock({str(out)!r}).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["distill", "--preset", "distill_cpu", "--max_steps", "2", "--out_dir", str(out), "--resume", "auto"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and f"{out} is in use by pid {holder.pid}" in err[0], err
        assert sorted(p.name for p in out.iterdir()) == [".kdnb.lock"]  # no metrics renamed, no checkpoint, no summary
    finally:
        holder.kill(); holder.wait()


@pytest.mark.parametrize("seed", range(3))
def test_pages_read_a_pipeline_folder_with_cut_files(tmp_path, seed):
    """A pipeline folder whose run files were cut at a random byte (a run killed while writing, a copy that stopped):
    every reader the results page uses gives its table or plot; a cut-off last metrics line is skipped, a stage
    whose summary is cut or missing counts as unfinished; no traceback."""
    import random
    import shutil
    from pathlib import Path
    import matplotlib
    matplotlib.use("Agg")
    from kdnb.pipeline import (MODEL_LABELS, describe_pipeline, first_stage, paired_table, pipeline_command,
                               plot_pipeline, results_table, seed_results)
    from kdnb.report import provenance
    src = Path(__file__).resolve().parent.parent / "results" / "digits"
    run = tmp_path / "digits"
    shutil.copytree(src, run)
    rng = random.Random(seed)
    cut = {}
    for name in ("metrics.jsonl", "summary.json"):  # every kind of file a run keeps rewriting or appending to
        for f in rng.sample(sorted(run.glob(f"*/{name}")), 3):
            data = f.read_bytes()
            f.write_bytes(data[: rng.randrange(1, len(data) - 1)])
            cut.setdefault(name, []).append(f.parent.name)
    (run / "linear_probe_teacher" / "summary.json").unlink(missing_ok=True)
    unfinished = set(cut["summary.json"]) | {"linear_probe_teacher"}
    rows = seed_results(run)
    name_of = {label: name for name, label in MODEL_LABELS.items()}
    stages = {f"{mode}_{name_of[label]}" for mode, label in zip(rows["mode"], rows["model"])}
    assert not stages & unfinished, stages & unfinished  # a cut or missing summary: that stage is not reported
    results_table(run); paired_table(run); plot_pipeline(run)
    describe_pipeline(run)
    provenance(run, pipeline_command(run), f"{first_stage(run)}/summary.json")
