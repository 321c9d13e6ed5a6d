"""Integration tests of whole runs through the command line: DDP with torchrun (gloo, 2 processes) and a
run killed with SIGKILL and resumed."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

KDNB = [sys.executable, "-m", "kdnb.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _losses(run):
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "step"]


def _distill_args(out, *extra):
    return ["distill", "--preset", "distill_cpu", "--device", "cpu", "--train_subset", "256", "--batch_size", "32",
            "--log_every", "1", "--tensorboard", "false", "--out_dir", str(out), *extra]


@pytest.mark.parametrize("students", [None, "a=:depth=2,b=:embed_dim=32:lr=5e-4"], ids=["one", "students"])
def test_ddp_two_processes_match_one(tmp_path, students):
    "The loss per step with 2 gloo processes x 16 images equals the single-process loss with batch 32 (a family too)."
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--max_steps", "4"] + (["--students", students] if students else [])
    subprocess.run(KDNB + _distill_args(one, *extra), check=True, env=ENV, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                        "-m", "kdnb.cli"] + _distill_args(two, *extra), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 4
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6), (a, b)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    wa = load_file(str(one / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(two / "checkpoints" / "last" / "model.safetensors"))
    # equal up to reduction order; Adam magnifies it where a gradient is ~0 (measured max diff 2.3e-5)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    if students:  # student b (width 32 against the teacher's 64) trains a width map, under DDP as alone
        assert wa["students.b.width_map.weight"].shape == (64, 32)


@pytest.mark.parametrize("students", [None, "a=:depth=2,b=:depth=1:drop_path=0.2:lr=5e-4"], ids=["one", "students"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, students):
    "A run killed with SIGKILL mid-epoch and resumed ends with the weights of an uninterrupted run (and each student's)."
    extra = ["--epochs", "2", "--ckpt_every", "3"] + (["--students", students] if students else [])
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(KDNB + _distill_args(full, *extra), check=True, env=ENV, capture_output=True)
    p = subprocess.Popen(KDNB + _distill_args(killed, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoints" / "last" / "state.pt"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 3: break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert step < 16, f"the run finished before it could be killed (step {step})"
    r = subprocess.run(KDNB + _distill_args(killed, *extra, "--resume", "true"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(full / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "summary.json").read_text())["steps"] == 16
    for name in ("a", "b") if students else ():  # each student's own folder: its last weights and its summary
        a, b = (load_file(str(r / "students" / name / "checkpoints" / "last" / "model.safetensors")) for r in (full, killed))
        assert all(torch.equal(a[k], b[k]) for k in a)
        s_full, s_killed = (json.loads((r / "students" / name / "summary.json").read_text()) for r in (full, killed))
        assert s_killed["finished"] and s_killed["metrics"] == s_full["metrics"] and s_killed["best"] == s_full["best"]


DIE_IN_CHECKPOINT_WRITE = """
import os, signal, sys
import kdnb.engine as E
from kdnb.cli import main
orig, saves = E.save_weights, []
def dying(module, path):  # the weights of the 3rd checkpoint are written, its state.pt never is
    saves.append(path)
    orig(module, path)
    if len(saves) == 3: os.kill(os.getpid(), signal.SIGKILL)
E.save_weights = dying
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_inside_a_checkpoint_write_then_resume_matches_uninterrupted(tmp_path):
    "Killed between writing a checkpoint's weights and its state: the previous checkpoint stays whole; resume is exact."
    extra = ["--epochs", "2", "--ckpt_every", "3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(KDNB + _distill_args(full, *extra), check=True, env=ENV, capture_output=True)
    r = subprocess.run([sys.executable, "-c", DIE_IN_CHECKPOINT_WRITE] + _distill_args(killed, *extra), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert list((killed / "checkpoints").glob(".*.tmp/model.safetensors"))  # the half-written one (here: best at step 8)
    assert torch.load(killed / "checkpoints" / "last" / "state.pt", weights_only=True)["step"] == 6
    r = subprocess.run(KDNB + _distill_args(killed, *extra, "--resume", "true"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(full / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    subprocess.run(KDNB + _distill_args(out, "--max_steps", "1"), check=True, env=ENV, capture_output=True)
    r = subprocess.run(KDNB + _distill_args(out, "--max_steps", "1"), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "resume=True" in r.stderr


ROOT = Path(__file__).resolve().parent.parent


def _papermill(tmp_path, nb, *params):
    args = [sys.executable, "-m", "papermill", str(ROOT / "nbs" / nb), str(tmp_path / "out.ipynb"), "--cwd", str(tmp_path)]
    for k, v in zip(params[::2], params[1::2]): args += ["-p", k, str(v)]
    return subprocess.run(args, env={k: v for k, v in ENV.items() if k != "IN_TEST"}, capture_output=True, text=True)


def test_papermill_run_finetune(tmp_path):
    "The card's command, on the embedded data set: papermill with -p parameters writes a run folder."
    r = _papermill(tmp_path, "run_finetune.ipynb", "dataset", "digits", "epochs", 1, "max_steps", 3,
                   "out_dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["kind"], s["dataset"], s["steps"]) == ("finetune", "digits", 3)


def test_papermill_run_pretrain_and_cli(tmp_path):
    "Pretraining from papermill and from the shell; the run folder then serves as a distillation teacher by name."
    r = _papermill(tmp_path, "run_pretrain.ipynb", "epochs", 1, "max_steps", 3, "out_dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["kind"], s["steps"], s["labels_used"], s["finished"]) == ("pretrain", 3, False, True)
    assert (tmp_path / "run" / "data2vec2.pt").exists()
    r = subprocess.run(KDNB + ["pretrain", "--preset", "pretrain_cpu", "--mask_prob", "0.99", "--out_dir",
                               str(tmp_path / "bad")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "mask_prob=0.99" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = subprocess.run(KDNB + ["distill", "--preset", "distill_cpu", "--teacher", f"run:{tmp_path / 'run'}",
                               "--teacher_layer_kind", "auto", "--embed_dim", "64", "--max_steps", "2",
                               "--train_subset", "64", "--tensorboard", "false", "--out_dir", str(tmp_path / "d")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["teacher_layers"] == 4


def test_papermill_unknown_parameter_fails(tmp_path):
    "papermill only warns about unknown parameters; the run notebook stops with the field named."
    r = _papermill(tmp_path, "run_finetune.ipynb", "batchsize", 8)
    assert r.returncode != 0
    assert "did you mean 'batch_size'" in r.stderr + r.stdout


@pytest.mark.slow
def test_papermill_cifar10_imagefolder(tmp_path):
    "The card's command on the real CIFAR-10 images beside the repository (ImageFolder, val carved from train)."
    root = ROOT.parent / "shared" / "data" / "cifar10"
    if not (root / "train").is_dir(): pytest.skip("../shared/data/cifar10 is not here")
    tmp = tmp_path
    r = _papermill(tmp, "run_finetune.ipynb", "dataset", "cifar10", "data_root", root, "epochs", 1,
                   "train_subset", 2000, "out_dir", tmp / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp / "run" / "summary.json").read_text())
    assert s["dataset"] == "cifar10" and s["val_source"].startswith("carved") and s["metrics"]["acc1"] > 10


def test_papermill_run_glue(tmp_path):
    "The GLUE run notebook as the issue writes it (-p task rte), on the real RTE files beside the repository."
    root = ROOT.parent / "shared" / "data" / "glue"
    if not (root / "RTE").is_dir(): pytest.skip("../shared/data/glue is not here")
    r = _papermill(tmp_path, "run_glue.ipynb", "task", "rte", "data_root", root, "layers", 2, "train_subset", 96,
                   "epochs", 1, "max_steps", 3, "max_len", 48, "out_dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["kind"], s["glue_task"], s["steps"], s["layers"], s["dev_examples"]) == ("glue", "rte", 3, 2, 277)
    assert 0 <= s["metrics"]["acc"] <= 100


def test_cli_ferkd_and_text(tmp_path):
    "FerKD and text distillation from the shell: `kdnb distill --objective ferkd`, `kdnb distill-text`."
    r = subprocess.run(KDNB + ["distill", "--preset", "ferkd_cpu", "--teacher", "tiny", "--train_subset", "64", "--label_crops", "8",
                               "--max_steps", "3", "--tensorboard", "false", "--out_dir", str(tmp_path / "ferkd")],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ferkd" / "summary.json").read_text())
    assert s["objective"] == "ferkd" and s["steps"] == 3 and (tmp_path / "ferkd" / "soft_labels" / "index.json").exists()
    root = ROOT.parent / "shared" / "data" / "glue"
    if not (root / "RTE").is_dir(): pytest.skip("../shared/data/glue is not here")
    r = subprocess.run(KDNB + ["distill-text", "--preset", "text_distill_cpu", "--data_root", str(root), "--sentence_tasks", "rte",
                               "--max_sentences", "200", "--val_size", "40", "--max_steps", "3", "--tensorboard", "false",
                               "--out_dir", str(tmp_path / "text")], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "text" / "summary.json").read_text())
    assert (s["kind"], s["steps"], s["train_sentences"]) == ("text_distill", 3, 160)


def test_cli_timm_teacher_into_timm_student_then_finetune(tmp_path, capsys, caplog):
    "Issue 25's done line: a timm ViT-S (patch 16, then DINOv2's patch 14) into a 2-block timm ViT-Ti, then finetuned."
    from kdnb.cli import main  # in this process: the subprocess tests above cover the console entry point
    # distill_cpu's models start random (pretrained=False, teacher_pretrained=False): so do the timm ones put in their place
    common = ["--preset", "distill_cpu", "--model", "timm:vit_tiny_patch16_224",
              "--depth", "2", "--img_size", "32", "--max_steps", "3", "--tensorboard", "false"]
    caplog.set_level(logging.INFO)
    for teacher in ("timm:vit_small_patch16_224", "timm:vit_small_patch14_dinov2"):
        run = tmp_path / teacher.split("_")[-1]
        assert main(["distill", "--teacher", teacher, *common, "--out_dir", str(run)]) == 0, capsys.readouterr().err
        s = json.loads((run / "summary.json").read_text())
        assert s["finished"] and s["width_map"] == "192 -> 384", s
    assert "teacher input 28x28 px" in caplog.text  # DINOv2's 14-px patches at the student's 2x2 grid
    capsys.readouterr()
    # the value that once meant random weights for a timm model gets one line saying what it is now (issue 36)
    assert main(["distill", *common, "--checkpoint", "random", "--out_dir", str(tmp_path / "old")]) == 2
    assert "checkpoint='random': random weights are pretrained=False now" in capsys.readouterr().err
    out = tmp_path / "finetune"
    assert main(["finetune", "--preset", "finetune_cpu", "--checkpoint", str(run), "--img_size", "32",
                 "--max_steps", "3", "--tensorboard", "false", "--out_dir", str(out)]) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] and s["steps"] == 3, s
    capsys.readouterr()
    # a teacher without a CLS token (SigLIP) is compared over the patch tokens both have (issue 36) ...
    assert main(["distill", "--teacher", "timm:vit_base_patch16_siglip_224", *common, "--out_dir",
                 str(tmp_path / "siglip")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "siglip" / "summary.json").read_text())["finished"]
    assert "the teacher has no CLS token: the target compares the patch tokens only" in caplog.text
    capsys.readouterr()
    # ... but an objective on the CLS token cannot pair it: one line before training, saying what differs
    assert main(["distill", "--objective", "contrastive", "--teacher", "timm:vit_base_patch16_siglip_224", *common,
                 "--out_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "this objective compares CLS tokens" in err[-1], err
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("objective", ["tinymim", "contrastive", "d2v+contrastive", "ferkd"])
def test_every_objective_with_a_timm_student(tmp_path, capsys, objective):
    """Issue 36: every objective trains a timm student of another width and patch size than the tiny teacher (the
    teacher runs on the student's grid; d2v+contrastive maps the widths). Each failed before: tinymim on the token
    count (65 against 5), d2v+contrastive on the width (192 against 64)."""
    from kdnb.cli import main
    out = tmp_path / "run"
    extra = (["--preset", "ferkd_cpu", "--teacher", "tiny", "--label_crops", "4", "--replay_crops", "2",
              "--train_subset", "64"] if objective == "ferkd" else ["--preset", "distill_cpu", "--objective", objective])
    args = ["distill", *extra, "--model", "timm:vit_tiny_patch16_224", "--depth", "2",
            "--img_size", "32", "--max_steps", "3", "--tensorboard", "false", "--out_dir", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] and s["steps"] == 3, s
    weights = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    assert any(k.endswith("blocks.1.attn.qkv.weight") and v.shape == (576, 192) for k, v in weights.items())  # timm's
    assert ("width_map.weight" in weights) == (objective == "d2v+contrastive"), [k for k in weights if "map" in k]


def test_students_from_the_command_line_to_export_and_finetuning(tmp_path):
    """`kdnb distill --students` with a timm student beside a Data2Vec2-style one; each student's folder is then a run
    folder that `kdnb export` and finetuning's --checkpoint take, and the family folder itself is refused in one line."""
    fam = tmp_path / "fam"
    students = "vt=timm:vit_tiny_patch16_224:pretrained=false:depth=1,half=:depth=1"
    r = subprocess.run(KDNB + _distill_args(fam, "--max_steps", "3", "--epochs", "1", "--img_size", "32",
                                            "--patch_size", "16", "--students", students), env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((fam / "summary.json").read_text())
    assert s["finished"] and set(s["students"]) == {"vt", "half"} and s["students"]["vt"]["width_map"] == "192 -> 64"
    r = subprocess.run(KDNB + ["export", str(fam / "students" / "vt"), "--out", str(tmp_path / "vt")], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    import timm
    m = timm.create_model(f"local-dir:{tmp_path / 'vt'}")
    assert len(m.blocks) == 1 and m.embed_dim == 192
    ft = ["finetune", "--preset", "finetune_cpu", "--device", "cpu", "--max_steps", "2", "--epochs", "1",
          "--train_subset", "64", "--tensorboard", "false", "--depth", "1"]
    r = subprocess.run(KDNB + ft + ["--checkpoint", str(fam / "students" / "half"), "--out_dir", str(tmp_path / "ft")],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["finished"]
    r = subprocess.run(KDNB + ft + ["--checkpoint", str(fam), "--out_dir", str(tmp_path / "ft2")], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "distilled several students (vt, half)" in r.stderr and "Traceback" not in r.stderr


def test_loader_workers_end_with_the_run(tmp_path):
    "A run with persistent loader workers exits without the 'DataLoader worker ... killed by signal' traceback."
    r = subprocess.run(KDNB + _distill_args(tmp_path / "w", "--max_steps", "2", "--epochs", "1", "--num_workers", "2"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "killed by signal" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_students_compile_blocks_and_step(tmp_path):
    "A family of students under torch.compile ('blocks' and 'step', drop path's generator swap inside) gives eager's losses."
    from kdnb.config import get_config
    from kdnb.distill import distill
    import kdnb.runs  # noqa: F401
    base = get_config("distill_cpu", max_steps=3, epochs=1, train_subset=128, tensorboard=False,
                      students="a=:depth=2,b=:depth=1:drop_path=0.1")
    eager = distill(base.replace(out_dir=str(tmp_path / "eager")))["metrics"]
    for how in ("blocks", "step"):
        got = distill(base.replace(compile=how, out_dir=str(tmp_path / how)))["metrics"]
        assert all(abs(got[k] - eager[k]) < 1e-5 for k in ("a/val_loss", "b/val_loss")), (how, got, eager)
