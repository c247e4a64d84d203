"""EMA teacher: closed-form averages, the BatchNorm rule, wrapped students, DDP ranks, a 200-step overfit."""

import copy
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from mt_scale.losses import mean_teacher_loss
from mt_scale.teacher import (
    average_buffers_over_ranks,
    create_teacher,
    ema_alpha,
    ema_update_loop,
    update_teacher,
)

REPO = Path(__file__).resolve().parents[2]


class TinyNet(nn.Module):
    """Linear-BN-ReLU-Linear returning the (class, consistency) pair like create_model's nets."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.body(x))
        return logits, logits


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: with other work on the machine, extra OpenMP threads only add spin-waiting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_create_teacher_is_a_detached_copy_in_train_mode():
    torch.manual_seed(0)
    student = TinyNet().eval()
    teacher = create_teacher(torch.compile(student))
    assert teacher is not student and teacher.training
    for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
        assert not t.requires_grad and s.requires_grad


def test_alpha_is_the_true_average_until_the_decay_caps_it():
    assert ema_alpha(0.99, 1) == 0.5
    assert ema_alpha(0.99, 2) == pytest.approx(2 / 3)
    assert ema_alpha(0.99, 9) == pytest.approx(0.9)
    assert ema_alpha(0.99, 1000) == 0.99


def test_after_k_steps_the_teacher_is_the_mean_of_the_student_weights():
    torch.manual_seed(1)
    student = TinyNet()
    teacher = create_teacher(student)
    history = [_params(student)]
    for step in range(1, 6):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p))
        history.append(_params(student))
        update_teacher(teacher, student, decay=0.999, step=step)
    for index, t in enumerate(teacher.parameters()):
        expected = torch.stack([h[index] for h in history]).mean(0)
        assert torch.allclose(t, expected, atol=1e-6)


def test_capped_decay_gives_the_exponential_average():
    torch.manual_seed(2)
    student = TinyNet()
    teacher = create_teacher(student)
    history = [_params(student)]
    for step in range(1, 5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        history.append(_params(student))
        assert update_teacher(teacher, student, decay=0.5, step=step) == 0.5
    # t_4 = 0.5^4 v0 + sum_{j=1..4} 0.5^(4-j+1) v_j
    for index, t in enumerate(teacher.parameters()):
        expected = 0.5**4 * history[0][index]
        for j in range(1, 5):
            expected = expected + 0.5 ** (4 - j + 1) * history[j][index]
        assert torch.allclose(t, expected, atol=1e-6)


def test_fused_update_equals_the_reference_loop():
    torch.manual_seed(3)
    student = TinyNet()
    fused, loop = create_teacher(student), create_teacher(student)
    for step in range(1, 30):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * torch.randn_like(p))
        update_teacher(fused, student, 0.9, step)
        ema_update_loop(loop, student, 0.9, step)
    for f, r in zip(fused.parameters(), loop.parameters(), strict=True):
        assert torch.allclose(f, r, atol=1e-6)


def test_batchnorm_buffers_follow_the_teachers_own_forward_passes():
    torch.manual_seed(4)
    student = TinyNet()
    teacher = create_teacher(student)
    with torch.no_grad():
        student(torch.randn(8, 6) * 5 + 3)  # moves the student's running stats only
        for p in student.parameters():
            p.add_(1.0)
    update_teacher(teacher, student, 0.99, step=1)
    bn = teacher.body[1]
    assert torch.equal(bn.running_mean, torch.zeros(16)) and torch.equal(bn.running_var, torch.ones(16))
    assert bn.num_batches_tracked.item() == 0  # buffers are neither averaged nor copied

    x = torch.randn(10, 6)
    with torch.no_grad():
        hidden = teacher.body[0](x)
        teacher(x)  # train mode: batch statistics, running stats updated with momentum 0.1
    assert torch.allclose(bn.running_mean, 0.1 * hidden.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * hidden.var(0, unbiased=True), atol=1e-6)
    assert bn.num_batches_tracked.item() == 1
    average_buffers_over_ranks(teacher)  # single process: a no-op
    assert torch.allclose(bn.running_mean, 0.1 * hidden.mean(0), atol=1e-6)


def test_no_gradient_reaches_the_teacher():
    torch.manual_seed(5)
    student = TinyNet()
    teacher = create_teacher(student)
    x, labels = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, -1, -1, -1, -1])
    terms = mean_teacher_loss(student(x), teacher(x + 0.1), labels, consistency_weight=10.0)
    terms["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_compiled_and_low_precision_students():
    torch.manual_seed(6)
    student = TinyNet()
    teacher, via_compiled = create_teacher(student), create_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_teacher(teacher, student, 0.9, step=3)
    update_teacher(via_compiled, torch.compile(student), 0.9, step=3)
    for a, b in zip(teacher.parameters(), via_compiled.parameters(), strict=True):
        assert torch.equal(a, b)

    low = copy.deepcopy(student).bfloat16()
    fp32_teacher = create_teacher(low)
    assert all(p.dtype == torch.float32 for p in fp32_teacher.parameters())
    before = _params(fp32_teacher)
    with torch.no_grad():
        for p in low.parameters():
            p.add_(0.5)
    alpha = update_teacher(fp32_teacher, low, 0.9, step=10)
    for t, b, s in zip(fp32_teacher.parameters(), before, low.parameters(), strict=True):
        assert t.dtype == torch.float32
        assert torch.allclose(t, alpha * b + (1 - alpha) * s.float(), atol=1e-6)


DDP_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from torch import nn
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_teacher import TinyNet
    from mt_scale.teacher import create_teacher, average_buffers_over_ranks, update_teacher

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial student on both ranks
    student = nn.parallel.DistributedDataParallel(TinyNet())
    # `teacher` averages its BatchNorm buffers over the ranks after every step, `unsynced` never, and
    # `at_read` only once at the end, as the loop does (at evaluation, checkpoint and export)
    teacher, unsynced, at_read = create_teacher(student), create_teacher(student), create_teacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # each rank reads different data
    for step in range(1, 7):
        x = torch.randn(8, 6, generator=data) + rank
        labels = torch.randint(0, 3, (8,), generator=data)
        teacher_x = torch.randn(8, 6, generator=data) * (1 + rank)
        with torch.no_grad():
            teacher(teacher_x)
            unsynced(teacher_x)
            at_read(teacher_x)
        loss = nn.functional.cross_entropy(student(x)[0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_teacher(teacher, student, 0.9, step)
        average_buffers_over_ranks(teacher)
        update_teacher(unsynced, student, 0.9, step)
        update_teacher(at_read, student, 0.9, step)
    average_buffers_over_ranks(at_read)
    torch.save(
        {"teacher": teacher.state_dict(), "unsynced": unsynced.state_dict(), "at_read": at_read.state_dict(),
         "student": student.module.state_dict()},
        os.path.join(os.environ["OUT_DIR"], f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ddp_students_give_the_same_teacher_on_every_rank(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OUT_DIR=str(tmp_path), TEST_DIR=str(Path(__file__).parent), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))  # fmt: skip
    workers = [
        subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(rank)), cwd=REPO)
        for rank in range(2)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
    bn_key = "body.1.running_mean"
    unsynced = [r["unsynced"][bn_key] for r in ranks]
    assert not torch.allclose(unsynced[0], unsynced[1])  # the ranks really saw different data
    # running statistics are linear in the batch statistics: the synced ones are the rank mean
    for key in (bn_key, "body.1.running_var"):
        mean = (ranks[0]["unsynced"][key] + ranks[1]["unsynced"][key]) / 2
        assert torch.allclose(ranks[0]["teacher"][key], mean, atol=1e-5)
        # averaging once where the statistics are read gives the teacher that averaging every step does
        assert torch.equal(ranks[0]["at_read"][key], ranks[1]["at_read"][key])
        assert torch.allclose(ranks[0]["at_read"][key], ranks[0]["teacher"][key], atol=1e-6)
    weight = "head.weight"
    assert torch.equal(ranks[0]["student"][weight], ranks[1]["student"][weight])
    assert not torch.allclose(ranks[0]["teacher"][weight], ranks[0]["student"][weight])


def test_overfit_student_fits_and_teacher_is_its_predicted_average():
    torch.manual_seed(7)
    student = TinyNet(features=8, hidden=32, classes=4)
    teacher = create_teacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    labeled_x, labels = torch.randn(16, 8), torch.arange(16) % 4
    unlabeled_x = torch.randn(16, 8)
    all_labels = torch.cat([labels, torch.full((16,), -1)])
    decay, history, lag = 0.95, [_params(student)], {}
    for step in range(1, 201):
        x = torch.cat([labeled_x, unlabeled_x])
        teacher_out = teacher(x + 0.05 * torch.randn_like(x))
        terms = mean_teacher_loss(student(x + 0.05 * torch.randn_like(x)), teacher_out, all_labels,
                                  consistency_weight=1.0)  # fmt: skip
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        update_teacher(teacher, student, decay, step)
        history.append(_params(student))
        if step == 15:
            lag = {name: _train_mode_class_loss(net, labeled_x, labels) for name, net in
                   (("student", student), ("teacher", teacher))}  # fmt: skip

    student.eval(), teacher.eval()
    with torch.no_grad():
        assert (student(labeled_x)[0].argmax(1) == labels).all()
        assert (teacher(labeled_x)[0].argmax(1) == labels).all()
    assert _train_mode_class_loss(student, labeled_x, labels) < 0.05
    assert lag["teacher"] > lag["student"]  # while the student learns fast, the teacher trails it
    # the teacher is exactly the exponential average the decay predicts, replayed by hand
    expected = [p.clone() for p in history[0]]
    for step in range(1, 201):
        alpha = min(1 - 1 / (step + 1), decay)
        expected = [alpha * e + (1 - alpha) * s for e, s in zip(expected, history[step], strict=True)]
    for t, e in zip(teacher.parameters(), expected, strict=True):
        assert torch.allclose(t, e, atol=1e-5)


def _train_mode_class_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    probe = copy.deepcopy(model).train()  # a copy, so the probe leaves the real BN buffers alone
    with torch.no_grad():
        return nn.functional.cross_entropy(probe(x)[0], labels).item()


def test_a_bf16_autocast_step_keeps_teacher_parameters_float32():
    torch.manual_seed(8)
    student = TinyNet()
    teacher = create_teacher(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    x, labels = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, -1, -1, -1, -1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_out, teacher_out = student(x), teacher(x)
        assert student_out[0].dtype == torch.bfloat16
        terms = mean_teacher_loss(student_out, teacher_out, labels, consistency_weight=1.0)
    assert terms["total"].dtype == torch.float32
    before = _params(teacher)
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    alpha = update_teacher(teacher, student, 0.99, step=1)
    for t, b, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        assert t.dtype == torch.float32
        assert torch.allclose(t, alpha * b + (1 - alpha) * s, atol=1e-7)
