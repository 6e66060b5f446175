"""Exit losses: every registered loss, and the exact weights of each."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exitnas.errors import ConfigError
from exitnas.losses import LOSSES, ExitLoss, build_loss, soft_distill


def _logits(k=3, n=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, c, generator=g, requires_grad=True) for _ in range(k)]
    labels = torch.randint(0, c, (n,), generator=g)
    return logits, labels


# Exceptions, each checked in tests/test_l2w_label_free.py: label_free's final exit is only the
# (detached) teacher of the heads; l2w weights the samples of a lone exit too (weights of mean 1).
FINAL_IS_TEACHER = ("label_free",)
ONE_EXIT_NOT_CE = ("l2w", "label_free")


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_a_finite_scalar_that_trains_every_exit(name):
    logits, labels = _logits()
    loss = build_loss(name, temperature=2.0, weight=0.5)(logits, labels, progress=1.0)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    loss.backward()
    for z in logits[:-1] if name in FINAL_IS_TEACHER else logits:
        assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in LOSSES.names() if n not in ONE_EXIT_NOT_CE])
def test_every_loss_of_one_exit_is_its_cross_entropy(name):
    logits, labels = _logits(k=1)
    loss = build_loss(name)(logits, labels)
    assert torch.allclose(loss, F.cross_entropy(logits[0], labels))


def test_mean_ce_is_the_mean_of_all_exits():
    logits, labels = _logits(k=4)
    want = sum(F.cross_entropy(z, labels) for z in logits) / 4
    assert torch.allclose(build_loss("mean_ce")(logits, labels), want)


def test_pabee_weights_exit_j_by_j():
    logits, labels = _logits(k=3)
    ce = [F.cross_entropy(z, labels) for z in logits]
    want = (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6
    assert torch.allclose(build_loss("pabee")(logits, labels), want)


def test_sdn_ramps_early_exit_weights_with_training_progress():
    logits, labels = _logits(k=3)
    ce = [F.cross_entropy(z, labels) for z in logits]
    sdn = build_loss("sdn")
    # at the start only the final exit counts
    assert torch.allclose(sdn(logits, labels, progress=0.0), ce[2])
    # at the end exit k of K has weight (k + 1) / K, the final 1
    full = (ce[0] / 3 + 2 * ce[1] / 3 + ce[2]) / (1 / 3 + 2 / 3 + 1)
    assert torch.allclose(sdn(logits, labels, progress=1.0), full)
    half = (ce[0] / 6 + ce[1] / 3 + ce[2]) / (1 / 6 + 1 / 3 + 1)
    assert torch.allclose(sdn(logits, labels, progress=0.5), half)


def test_distill_weight_zero_is_mean_ce_and_teacher_is_detached():
    logits, labels = _logits(k=3)
    plain = build_loss("distill", weight=0.0)(logits, labels)
    assert torch.allclose(plain, build_loss("mean_ce")(logits, labels))
    # weight 1: early exits learn only from the final exit; the final only from the labels
    loss = build_loss("distill", weight=1.0, temperature=2.0)(logits, labels)
    loss.backward()
    ref = logits[2].detach().clone().requires_grad_(True)
    (F.cross_entropy(ref, labels) / 3).backward()
    assert torch.allclose(logits[2].grad, ref.grad)


def test_distill_value_matches_the_byot_formula():
    logits, labels = _logits(k=2)
    t, w = 3.0, 0.3
    z, teacher = logits[0], logits[1].detach()
    kl = F.kl_div(F.log_softmax(z / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    want = ((1 - w) * F.cross_entropy(z, labels) + w * kl + F.cross_entropy(logits[1], labels)) / 2
    assert torch.allclose(build_loss("distill", temperature=t, weight=w)(logits, labels), want)
    assert torch.allclose(soft_distill(teacher, teacher, t), torch.tensor(0.0), atol=1e-6)


def test_boost_downweights_samples_the_previous_exit_already_gets_right():
    labels = torch.tensor([0, 1])
    first = torch.tensor([[20.0, -20.0], [0.0, 0.0]])  # sample 0 solved, sample 1 unsure
    second = torch.zeros(2, 2, requires_grad=True)
    build_loss("boost")([first, second], labels).backward()
    g = second.grad.abs().sum(dim=1)
    assert g[0] < 0.01 * g[1]  # weight floor 1e-3 vs (1 - 0.5)


def test_unknown_loss_names_the_field_and_the_choices():
    with pytest.raises(ConfigError) as err:
        build_loss("focal")
    msg = str(err.value)
    assert msg.startswith("retrain.loss: unknown loss 'focal'")
    for name in LOSSES.names():
        assert name in msg


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError):
        LOSSES.register("mean_ce")(ExitLoss)
