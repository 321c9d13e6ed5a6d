"""The hyperparameter tables of the report, generated from kdnb.config's presets, against the seed files.

Every number in a seed's row must appear, in order, in the generated row with the same label."""
import re
from pathlib import Path

import pytest

SEEDS = Path(__file__).resolve().parent.parent.parent / "shared" / "seeds"
pytestmark = pytest.mark.skipif(not SEEDS.is_dir(), reason="../shared/seeds is not beside the repository")

# the seeds' labels (typos included) -> the report's labels
LABELS = {"Attention Heads": "Attention heads", "AdamW ϵ": "AdamW ε", "Label smooting": "Label smoothing",
          "Magintude": "Magnitude", "Layer Decay": "Layer decay", "Mixup prob.": "Mixup alpha", "Cutmix prob.": "CutMix alpha",
          "mixup alpha": "Mixup alpha", "cutmix alpha": "CutMix alpha", "prob": "Prob.", "switch prob": "Switch prob.",
          "mode": "Mode", "label smooting": "Label smoothing", "Peak learning rate": "Base learning rate",
          "AdamW $\\epsilon$": "AdamW ε", "AdamW $\\beta$": "AdamW β", "LayerNorm $\\epsilon$": "LayerNorm ε",
          "LayerNorm Weight Init": "LayerNorm weight init", "LayerNorm Bias Init": "LayerNorm bias init",
          "Linear Head Weight Init": "Linear head weight init", "Linear Head Bias Init": "Linear head bias init"}
SECTIONS = {"Mixup [1]/Cutmix [2]": "Mixup/CutMix", "RandAugment [3]": "RandAugment", "RandomErase [4]": "RandomErase",
            "<b>Model</b>": "Model", "<b>Training</b>": "Training", "<b>Mixup</b>": "Mixup/CutMix"}
NOT_CONFIG = {"Hardware", "cutmix minmax", "num_classes"}  # not hyperparameters of the code (or of another data set)


def numbers(s: str) -> list[float]:
    return [float(m.group(1)) * (1000 if m.group(2) else 1) for m in re.finditer(r"(\d+(?:\.\d+)?(?:e-?\d+)?)(k?)", str(s))]


def seed_rows(name: str, table_caption: str) -> list[tuple[str, str, str]]:
    "(section, label, value) of the table that ends with `table_caption` in seed file `name`."
    text = next(SEEDS.glob(f"{name}_*.txt")).read_text()
    block = text[:text.index(table_caption)]
    block = block[block.rindex("\n\n", 0, len(block) - 2):]
    rows, section = [], None
    for line in block.strip().splitlines():
        cells = line.split("\t")
        if len(cells) < 3 or cells[1] in ("Hyperparameters", ""): continue
        section = SECTIONS.get(cells[0], cells[0]) or section if cells[0] else section
        rows.append((section, cells[1], cells[2]))
    return rows


def check(rows, generated, column):
    checked = 0
    for section, label, value in rows:
        if label in NOT_CONFIG: continue
        ours = LABELS.get(label, label)
        keys = [k for k in generated.index if (k[1] if isinstance(k, tuple) else k) == ours
                and (not isinstance(k, tuple) or section is None or k[0] == section or k[0] == "Training")]
        assert keys, f"no row {ours!r} ({section}) in the generated table"
        got = generated.loc[keys[0], column]
        want = numbers(value)
        if want:
            assert numbers(got) == want, f"{label}: seed {value!r}, generated {got!r}"
        else:
            assert str(got).strip().lower() == value.replace("$\\times$", "").strip().lower(), f"{label}: seed {value!r}, generated {got!r}"
        checked += 1
    return checked


def test_distill_table_matches_seed_000_table_1():
    from kdnb.report import distill_table
    assert check(seed_rows("000", "Table 1: Hyperparameters used for distilling"), distill_table(), "value") >= 17


def test_finetune_table_matches_seed_000_table_2():
    from kdnb.report import finetune_table
    rows = [(s, l, v) for s, l, v in seed_rows("000", "Table 2: Hyperparameters used for the ImageNet-1K")]
    t = finetune_table()
    for col in t.columns:  # the seed gives one value for all six columns
        assert check(rows, t, col) >= 19


def test_seed003_table_matches_preset_and_head():
    from kdnb.report import seed_comparison_table, head_table
    rows = seed_rows("003", "Table 1: Hyperparameters used for the imagenet finetuning")
    model = [r for r in rows if r[0] == "Model"]
    train = [r for r in rows if r[0] != "Model" and r[1] != "Timestep aggregation"]
    assert check(model, head_table(), "value") == 6
    assert check(train, seed_comparison_table(), "seed 003, Table 1 (preset finetune_seed003)") >= 12


def test_layer_decay_table_matches_seed_004():
    from kdnb.report import layer_decay_table
    text = next(SEEDS.glob("004_*.txt")).read_text()
    line = next(l for l in text.splitlines() if l.startswith("Learning rate\t"))
    assert numbers(" ".join(layer_decay_table().loc["Learning rate"])) == numbers(line)


def test_glue_table_matches_seed_000_table_3():
    from kdnb.report import glue_table
    t = glue_table()
    rows = seed_rows("000", "Table 3: Hyperparameters for the GLUE")
    for col in t.columns:  # one value for all tasks, except the metric row
        assert check([r for r in rows if r[1] != "Metric"], t, col) >= 10
    text = next(SEEDS.glob("000_*.txt")).read_text()
    header = next(l for l in text.splitlines() if l.startswith("Type\tHyperparameters\tMNLI"))
    metric = next(l for l in text.splitlines() if l.strip().startswith("Metric\t"))
    tasks, metrics = header.split("\t")[2:], metric.strip().split("\t")[1:]
    assert len(tasks) == len(metrics) == 8
    for task, m in zip(tasks, metrics):
        assert t.loc[("Training", "Metric"), task] == m, (task, m)


def test_ferkd_table_matches_seed_002_table_1():
    from kdnb.report import ferkd_table
    t = ferkd_table()
    text = next(SEEDS.glob("002_*.txt")).read_text()
    block = text[text.index("Backbone\tResNet-50"):text.index("Table 1: Pre-training setting")]
    checked = 0
    for line in block.strip().splitlines():
        cells = line.split("\t")
        label, values = cells[0], cells[1:]
        if label in ("Backbone", "Dropout", "Repeated Aug", "Rand Augment", "Random erasing"): continue  # not kdnb settings
        if len(values) == 1: values = values * 2  # one value for both columns
        for col, want in zip(t.columns, values):
            got = t.loc[label, col]
            if want.strip() == "\\times": assert got == "×", (label, col, got)
            else: assert numbers(got) == numbers(want) or got.lower() == want.lower(), (label, col, got, want)
            checked += 1
    assert checked >= 24


REFS = SEEDS.parent / "refs"


def yaml_value(doc: dict, path: str):
    "A dotted path into the yaml; `a * b` multiplies two paths (per-GPU batch x GPUs)."
    if "*" in path:
        a, b = (yaml_value(doc, p.strip()) for p in path.split("*"))
        return a * b
    for part in path.split("."): doc = doc[part]
    if isinstance(doc, str):  # PyYAML reads 1e-6 (no dot) as a string
        try: return float(doc)
        except ValueError: pass
    return doc


def test_pretrain_preset_is_fairseqs_yaml():
    "Every row of the pretraining table that names a fairseq field holds the value of data2vec 2.0's base yaml."
    import yaml
    from kdnb.config import get_config
    from kdnb.report import PRETRAIN_ROWS, pretrain_table
    doc = yaml.safe_load((REFS / "data2vec2_base_images_only_task.yaml").read_text())
    cfg, checked = get_config("pretrain"), 0
    for section, label, value, field in PRETRAIN_ROWS:
        if field is None: continue
        want, got = yaml_value(doc, field), value(cfg)
        if field == "optimization.lr": want = want[0]  # fairseq's lr is a per-update list
        if field.endswith("._name"):  # names: adam (decoupled weight decay, as AdamW), cosine
            assert str(want).lower() in str(got).lower(), (label, want, got)
        elif isinstance(want, list):
            assert list(got) == want, (label, want, got)
        else:
            assert got == want and isinstance(got, bool) == isinstance(want, bool), (label, want, got)  # 4 == 4.0; True != 1
        checked += 1
    assert checked >= 28, checked
    # the model depth of the yaml counts the main blocks; the prenet adds 2: a ViT-B of 12 blocks
    assert cfg.depth + cfg.prenet_depth == 12
    # the table shows the preset's values (what the code runs), not the yaml's
    t = pretrain_table(cfg.replace(mask_prob=0.7))
    assert t.loc[("Masking", "Mask prob."), "value"] == "0.7"


def test_pretrain_check_can_fail():
    "A preset value that differs from the yaml is caught (the comparison above is not vacuous)."
    import yaml
    from kdnb.config import get_config
    from kdnb.report import PRETRAIN_ROWS
    doc = yaml.safe_load((REFS / "data2vec2_base_images_only_task.yaml").read_text())
    cfg = get_config("pretrain").replace(ema_end_decay=0.9999, clone_batch=8)
    bad = [label for _, label, value, field in PRETRAIN_ROWS
           if field and not field.endswith("._name") and field != "optimization.lr"
           and not isinstance(yaml_value(doc, field), list) and value(cfg) != yaml_value(doc, field)]
    assert bad == ["Clones per image", "Decay at end"], bad


def seed_grid(name: str, table_caption: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    "Columns and (label, one value per column) of a seed table without a section column (seed 001's)."
    text = next(SEEDS.glob(f"{name}_*.txt")).read_text()
    block = text[:text.index(table_caption)]
    block = block[block.rindex("\n\n", 0, len(block) - 2):].strip().splitlines()
    columns = block[0].split("\t")[1:]
    rows = []
    for line in block[1:]:
        cells = line.split("\t")
        values = [v for v in cells[1:] if v.strip()]
        if not values: continue
        rows.append((cells[0], values * len(columns) if len(values) == 1 else values))  # one value: every column
    return columns, rows


# rows where the seed gives one value per schedule ("100/300", "5/15"); the presets take the 300-epoch one
TWO_SCHEDULES = {"Pre-training epochs", "Warmup epochs", "Stochastic depth"}


def check_grid(rows, table) -> int:
    checked = 0
    for label, values in rows:
        assert label in table.index, f"no row {label!r} in the generated table"
        for col, want in zip(table.columns, values):
            got = table.loc[label, col]
            if want.strip() in ("\\times", "$\\times$"):
                assert got == "×", (label, col, got)
            elif "/" in want and label in TWO_SCHEDULES:
                assert numbers(got)[0] == numbers(want)[-1], (label, col, got, want)  # the 300-epoch schedule's
            elif numbers(want):
                assert numbers(got) == numbers(want), (label, col, got, want)
            else:
                assert got.lower() == want.strip().lower(), (label, col, got, want)
            checked += 1
    return checked


def test_tinymim_tables_match_seed_001():
    from kdnb.report import tinymim_table, tinymim_finetune_table
    cols, rows = seed_grid("001", "Table 1. Hyper-parameters of ImageNet-1K Pre-training.")
    assert cols == ["ViT-T", "ViT-S", "ViT-B"]
    assert check_grid(rows, tinymim_table()) >= 19 * 3
    cols, rows = seed_grid("001", "Table 2. Hyper-parameters of ImageNet-1K image classification fine-tuning.")
    assert check_grid(rows, tinymim_finetune_table()) >= 18 * 3


def test_tinymim_segmentation_table_matches_seed_001_table_3():
    from kdnb.report import tinymim_segment_table
    from kdnb.kinds import SEG_LAYER_DECAYS
    cols, rows = seed_grid("001", "Table 3. Hyper-parameters of ADE20K semantic segmentation fine-tuning.")
    assert cols == ["ViT-S", "ViT-B"]
    t = tinymim_segment_table()
    choice = [(l, v) for l, v in rows if l == "Layer-wise learning rate decay"]
    assert len(choice) == 1 and numbers(choice[0][1][0]) == list(SEG_LAYER_DECAYS)  # the seed's set {0.65, 0.75, 0.8}
    for got in t.loc["Layer-wise learning rate decay"]:  # the preset's value, then the set it was taken from
        assert numbers(got)[0] in SEG_LAYER_DECAYS and numbers(got)[1:] == list(SEG_LAYER_DECAYS), got
    assert check_grid([(l, v) for l, v in rows if l != "Layer-wise learning rate decay"], t) >= 12 * 2


def test_tinymim_check_can_fail():
    "A preset value unlike the seed's is caught (the comparison above is not vacuous)."
    from kdnb.report import tinymim_finetune_table
    _, rows = seed_grid("001", "Table 2. Hyper-parameters of ImageNet-1K image classification fine-tuning.")
    t = tinymim_finetune_table()
    t.loc["Layer-wise learning rate decay", t.columns[1]] = "0.75"
    with pytest.raises(AssertionError, match="Layer-wise"):
        check_grid(rows, t)


def test_ferkd_finetune_table_matches_seed_002_table_2():
    from kdnb.report import ferkd_finetune_table
    t = ferkd_finetune_table().iloc[:, 0]
    text = next(SEEDS.glob("002_*.txt")).read_text()
    block = text[text.index("Backbone\tViT-G/14"):text.index("Table 2: Fine-tuning setting")]
    checked = 0
    for line in block.strip().splitlines()[1:]:  # the Backbone row: ViT-G/14 is substituted (the row says by what)
        label, want = line.split("\t")
        got = t[label]
        if want.strip() == "\\times": assert got == "×", (label, got)
        elif label == "Drop path": assert numbers(got) == numbers(want)[:1], (label, got, want)  # the ViT-G column
        else: assert numbers(got) == numbers(want) or got.lower() == want.lower(), (label, got, want)
        checked += 1
    assert checked == 21, checked
    assert "ViT-G/14" in t["Backbone"]
