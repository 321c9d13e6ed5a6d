"""The thesis pair's DistillTask loss and one gradient sum, printed in full precision, to compare two commits bit for bit
(a refactor that changes nothing a run computes prints the same two lines at both):

    git worktree add /tmp/old <commit>
    for t in /tmp/old .; do PYTHONPATH=$t .venv/bin/python bench/loss_fingerprint.py; done
"""
import torch, timm, kdnb
from kdnb.models import Data2Vec2Encoder, FrozenTeacher
from kdnb.distill import DistillTask
torch.manual_seed(0)
beit = timm.create_model("beitv2_base_patch16_224", num_classes=0, global_pool="token", img_size=32, patch_size=8,
                         embed_dim=64, depth=4, num_heads=4, use_shared_rel_pos_bias=True, use_rel_pos_bias=False,
                         init_values=0.1)
d2v_t = Data2Vec2Encoder(32, 8, 64, 4, 4)
x = torch.randn(4, 3, 32, 32)
for name, teacher in (("beitv2 teacher", FrozenTeacher(beit)), ("data2vec2 teacher", FrozenTeacher(d2v_t, kind="ffn"))):
    torch.manual_seed(1)
    student = Data2Vec2Encoder(32, 8, 64, 2, 4)
    task = DistillTask(student, teacher, "ffn")
    loss = task((x, None))["loss"]
    loss.backward()
    g = sum(p.grad.double().abs().sum() for p in student.parameters() if p.grad is not None)
    print(f"{name}: loss {loss.item()!r} grad_abs_sum {g.item()!r} ({kdnb.__file__})")
