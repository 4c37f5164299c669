"""Augmentations by name, the soft-target loss, optimisers, schedules and early stopping."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allcluster.train.affine import ClassicAffine
from allcluster.train.augment import BatchMixer, image_transform, soft_cross_entropy
from allcluster.train.optim import EarlyStopping, EpochScheduler, WeightAverage, build_optimizer
from allcluster.train.config import AugmentConfig, ClassicAugConfig, OptimConfig, ScheduleConfig
from allcluster.train.data import Split, balanced_class_weights, oversample_minority


def uint8_image(size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(30, 220, (3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", ["classic", "randaug", "augmix"])
def test_per_image_augmentations_keep_shape_and_dtype_and_change_pixels(name):
    torch.manual_seed(0)
    transform = image_transform(AugmentConfig(name=name))
    image = uint8_image()
    outputs = [transform(image) for _ in range(4)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outputs)
    assert any(not torch.equal(o, image) for o in outputs)


@pytest.mark.parametrize("name", ["none", "mixup", "cutmix"])
def test_batch_level_and_no_augmentation_have_no_per_image_transform(name):
    assert image_transform(AugmentConfig(name=name)) is None


def test_classic_nearest_fill_leaves_no_black_border():
    torch.manual_seed(1)
    bright = torch.full((3, 40, 40), 200, dtype=torch.uint8)
    strong = ClassicAugConfig(rotation=30, width_shift=0.2, height_shift=0.2, zoom=0.3, fill_mode="nearest")
    constant = ClassicAugConfig(rotation=30, width_shift=0.2, height_shift=0.2, zoom=0.3, fill_mode="constant")
    assert all(int(ClassicAffine(strong)(bright).min()) == 200 for _ in range(10))
    assert any(int(ClassicAffine(constant)(bright).min()) == 0 for _ in range(10))


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect"])
def test_whole_pixel_shifts_skip_resampling_and_give_the_affines_pixels(fill_mode, monkeypatch):
    image = torch.randint(0, 256, (3, 37, 52), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shifts_only = ClassicAffine(ClassicAugConfig(rotation=0, shear=0, zoom=0, width_shift=0.5,
                                                 height_shift=0.5, fill_mode=fill_mode))
    for dx, dy in [(0, 0), (1, -1), (-26, 18), (25, -18), (-3, 0), (0, 7)]:
        params = {"angle": 0.0, "translate": [dx, dy], "scale": 1.0, "shear": [0.0, 0.0]}
        assert torch.equal(shifts_only.shift(image, dx, dy), shifts_only.resample(image, params)), (dx, dy)
    monkeypatch.setattr(ClassicAffine, "resample", lambda *a: pytest.fail("resampled a whole-pixel shift"))
    torch.manual_seed(0)
    assert any(not torch.equal(shifts_only(image), image) for _ in range(5))


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixing_returns_soft_targets_that_sum_to_one(name):
    torch.manual_seed(0)
    mixer = BatchMixer(AugmentConfig(name=name, mixup_alpha=1.0), num_classes=4, label_smoothing=0.1)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, targets = mixer(images, labels)
    assert mixed.shape == images.shape and targets.shape == (8, 4)
    assert torch.allclose(targets.sum(1), torch.ones(8), atol=1e-5)
    assert (targets > 0.1 / 4 + 1e-3).sum(1).max() >= 2    # some rows really mix two classes


def test_soft_cross_entropy_matches_torch_for_hard_labels_with_smoothing_and_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 4), torch.randint(0, 4, (10,))
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    _, targets = BatchMixer(AugmentConfig(), 4, label_smoothing=0.1)(torch.zeros(10, 1), labels)
    ours = soft_cross_entropy(logits, targets)
    assert torch.allclose(ours, F.cross_entropy(logits, labels, label_smoothing=0.1), atol=1e-6)
    one_hot = F.one_hot(labels, 4).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot, weights), F.cross_entropy(logits, labels, weight=weights), atol=1e-6)


def test_oversampling_brings_minority_classes_to_the_majority_count():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 7)
    split = Split("train", np.arange(21), labels, tuple(f"p{i}" for i in range(21)))
    enlarged, copies = oversample_minority(split, seed=0)
    assert np.bincount(enlarged.labels).tolist() == [10, 10, 10]
    assert copies.sum() == 9 and not copies[:21].any()
    assert set(enlarged.rows[copies]) <= set(np.flatnonzero(labels != 0))


def test_balanced_class_weights_follow_sklearn():
    from sklearn.utils.class_weight import compute_class_weight
    labels = np.array([0] * 10 + [1] * 4 + [2] * 7)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert np.allclose(balanced_class_weights(labels, 3).numpy(), expected)


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop", "adadelta", "adamax", "adamw"])
def test_every_optimizer_builds_and_reduces_a_loss(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    lr = 1.0 if name == "adadelta" else 0.05
    opt = build_optimizer(OptimConfig(name=name, weight_decay=0.0, nesterov=True), model.parameters(), lr)
    start = F.mse_loss(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert F.mse_loss(model(x), y).item() < start
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_only_trainable_parameters_reach_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(OptimConfig(), model.parameters(), 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 3


def test_plateau_schedule_reduces_lr_when_val_f1_stalls():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = EpochScheduler(ScheduleConfig(name="plateau", factor=0.1, patience=1), opt, epochs=10)
    for score in (0.5, 0.6, 0.6, 0.6):
        sched.step(score)
    assert math.isclose(opt.param_groups[0]["lr"], 0.1)


def test_cosine_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = EpochScheduler(ScheduleConfig(name="cosine", warmup_epochs=2), opt, epochs=10)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()  # an epoch's updates come first (PyTorch warns about a schedule stepped alone)
        sched.step(0.0)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[-1] < 0.05
    constant = EpochScheduler(ScheduleConfig(name="constant"), opt, 10)
    before = opt.param_groups[0]["lr"]
    constant.step(0.1)
    assert opt.param_groups[0]["lr"] == before


def test_early_stopping_counts_epochs_without_val_f1_gain():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(0.5) and not stopper.should_stop
    assert not stopper.update(0.5) and not stopper.should_stop
    assert not stopper.update(float("nan")) and stopper.should_stop
    assert not EarlyStopping(patience=0, bad_epochs=99).should_stop


def test_weight_average_ramps_its_decay_to_the_cap_and_resumes_where_it_stopped():
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, decay=0.9)
    expected = None
    for step in range(1, 41):
        value = float(step % 3)                       # weights that keep moving
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
        ramp = 0.0 if step == 1 else 1 - step ** -0.75  # timm counts the first update as step 0
        decay = min(0.9, ramp)
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert math.isclose(average.module.weight.item(), expected, rel_tol=1e-5), step
    assert 1 - 40 ** -0.75 > 0.9, "the last steps ran at the cap"

    state = average.state_dict()
    resumed = WeightAverage(torch.nn.Linear(1, 1, bias=False), decay=0.9)
    resumed.load_state_dict(state)
    assert resumed.steps == average.steps == 40
    with torch.no_grad():
        model.weight.fill_(5.0)
    for each in (average, resumed):
        each.update(model)
    assert resumed.module.weight.item() == average.module.weight.item()
    assert math.isclose(average.module.weight.item(), 0.9 * expected + 0.1 * 5.0, rel_tol=1e-5)


def test_each_optimizer_gets_its_own_documented_rate_unless_one_is_given():
    from allcluster.config import from_dict
    from allcluster.train.config import TrainConfig, resolve
    from allcluster.train.optim import OPTIMIZERS

    def rates(optim: dict, **model) -> tuple[float, float]:
        cfg = resolve(from_dict(TrainConfig, {"data": {"manifest": "m"}, "optim": optim,
                                              "model": {"backbone": "allnet", **model}}))
        return cfg.optim.lr, cfg.finetune.head_lr

    for name, spec in OPTIMIZERS.items():
        assert rates({"name": name}) == (spec.lr_fresh, spec.lr_fresh), "from scratch: the fresh-weights rate"
        assert rates({"name": name}, weights="w.pt") == (spec.lr_finetune, spec.lr_fresh), "pretrained: fine-tune"
    assert rates({"name": "sgd", "lr": 0.2}) == (0.2, OPTIMIZERS["sgd"].lr_fresh)
    assert OPTIMIZERS["adadelta"].lr_fresh == 1.0 and OPTIMIZERS["sgd"].lr_fresh > OPTIMIZERS["adam"].lr_fresh
    built = build_optimizer(from_dict(TrainConfig, {"optim": {"name": "rmsprop"}}).optim,
                            [torch.nn.Parameter(torch.zeros(2))], 0.01)
    assert isinstance(built, torch.optim.RMSprop) and built.param_groups[0]["lr"] == 0.01
