"""The LR schedule against Megatron-LM's definition (OptimizerParamScheduler.get_lr, in
iterations), written out by hand at chosen steps: warmup from an initial LR, constant,
linear and cosine decay, a decay that ends before the run does, and WSD with each anneal
shape at its definition points. Step k is the optimizer step with k steps before it."""

import math

import pytest
import torch

from sat_dist.config import TrainConfig
from sat_dist.errors import SatDistError
from sat_dist.train.lr import lr_at, schedule_of

LR, MIN = 1e-3, 1e-4


def test_warmup_from_an_initial_lr():
    # init + (lr - init) * k / warmup, for k <= warmup (step 0 runs at init, step warmup at lr)
    kw = dict(lr=LR, min_lr=MIN, warmup=4, decay_iters=20, style="cosine", warmup_init=2e-4)
    assert lr_at(0, **kw) == pytest.approx(2e-4)
    assert lr_at(1, **kw) == pytest.approx(2e-4 + 8e-4 * 0.25)
    assert lr_at(3, **kw) == pytest.approx(2e-4 + 8e-4 * 0.75)
    assert lr_at(4, **kw) == pytest.approx(LR)
    assert lr_at(0, LR, MIN, 4, 20, "cosine") == 0.0  # default init 0


def test_cosine_and_linear_decay():
    # decay ratio r = (k - warmup) / (decay - warmup): cosine 0.5 (cos(pi r) + 1), linear 1 - r
    warmup, decay = 2, 12
    for k in (3, 5, 7, 10, 12):
        r = (k - warmup) / (decay - warmup)
        cos = MIN + (LR - MIN) * 0.5 * (math.cos(math.pi * r) + 1)
        lin = MIN + (LR - MIN) * (1 - r)
        assert lr_at(k, LR, MIN, warmup, decay, "cosine") == pytest.approx(cos, rel=1e-12), k
        assert lr_at(k, LR, MIN, warmup, decay, "linear") == pytest.approx(lin, rel=1e-12), k
    assert lr_at(7, LR, MIN, warmup, decay, "cosine") == pytest.approx(MIN + (LR - MIN) / 2)  # midpoint
    assert lr_at(12, LR, MIN, warmup, decay, "linear") == pytest.approx(MIN)


def test_constant_ignores_decay():
    for k in (3, 11, 50):
        assert lr_at(k, LR, MIN, 2, 12, "constant") == LR
    assert lr_at(1, LR, MIN, 2, 12, "constant") == pytest.approx(LR / 2)  # it still warms up


def test_decay_shorter_than_the_run_ends_at_min_lr():
    # past --lr-decay-iters every step runs at min_lr, whatever the run's length
    for style in ("cosine", "linear"):
        assert lr_at(10, LR, MIN, 2, 10, style) == pytest.approx(MIN)
        for k in (11, 15, 1000):
            assert lr_at(k, LR, MIN, 2, 10, style) == MIN


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5 ** 0.5 - 1),
                                       ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd_each_anneal_shape(shape, mid):
    # warmup 2, stable until decay_iters - wsd = 20 - 8 = 12, anneal over (12, 20], min_lr after
    kw = dict(lr=LR, min_lr=MIN, warmup=2, decay_iters=20, style="WSD", wsd_decay_iters=8, wsd_style=shape)
    assert lr_at(1, **kw) == pytest.approx(LR / 2)
    for k in (2, 3, 8, 12):
        assert lr_at(k, **kw) == LR, k  # stable
    assert lr_at(16, **kw) == pytest.approx(MIN + mid * (LR - MIN), rel=1e-12)  # r = 4/8
    r = 1 / 8
    first = {"linear": 1 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1), "exponential": 2 * 0.5 ** r - 1,
             "minus_sqrt": 1 - math.sqrt(r)}[shape]
    assert lr_at(13, **kw) == pytest.approx(MIN + first * (LR - MIN), rel=1e-12)
    assert lr_at(20, **kw) == pytest.approx(MIN, abs=1e-15)  # end of the anneal
    assert lr_at(21, **kw) == MIN


def test_schedule_of_a_config_defaults_decay_to_train_iters():
    t = TrainConfig(train_iters=10, lr=LR, min_lr=MIN, lr_warmup_iters=0, lr_decay_style="linear").validate()
    assert schedule_of(t)(5) == pytest.approx(MIN + (LR - MIN) * 0.5)
    t = TrainConfig(train_iters=10, lr=LR, min_lr=MIN, lr_warmup_iters=0, lr_decay_style="linear",
                    lr_decay_iters=4).validate()
    assert schedule_of(t)(2) == pytest.approx(MIN + (LR - MIN) * 0.5) and schedule_of(t)(5) == MIN


def test_lambda_lr_factor_gives_the_schedule():
    """build_engine's LambdaLR multiplies --lr by lr_at / lr: the optimizer then runs at
    lr_at exactly, also with --lr-warmup-init > 0, and at 0 throughout with --lr 0."""
    from sat_dist.train.lr import decay_iters_of

    for lr, init in ((LR, 3e-4), (0.0, 0.0)):
        t = TrainConfig(train_iters=8, lr=lr, min_lr=0.0, lr_warmup_iters=3, lr_warmup_init=init).validate()
        f = schedule_of(t)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: f(k) / t.lr if t.lr > 0 else 0.0)
        seen = []
        for _ in range(8):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        want = [lr_at(k, lr, 0.0, 3, decay_iters_of(t), "cosine", init) for k in range(8)]
        assert seen == pytest.approx(want, rel=1e-12, abs=0)
    assert seen == [0.0] * 8


@pytest.mark.parametrize("kw,msg", [
    (dict(lr_decay_style="WSD"), "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (dict(lr_decay_style="WSD", lr_wsd_decay_iters=9, lr_warmup_iters=2, train_iters=10),
     "--lr-wsd-decay-iters: got 9; allowed: an integer in [0, --lr-decay-iters - --lr-warmup-iters] = [0, 10 - 2]"),
    (dict(lr_decay_iters=3, lr_warmup_iters=5), "--lr-decay-iters: got 3; allowed: an integer >= --lr-warmup-iters"),
    (dict(lr_warmup_init=1.0, lr=0.5), "--lr-warmup-init: got 1.0; allowed: a number in [0, --lr]"),
    (dict(lr_warmup_init=-1e-5), "--lr-warmup-init: got -1e-05"),
    (dict(finetune=True), "--finetune: says how to load a checkpoint, but no --load is given"),
    (dict(no_load_rng=True), "--no-load-rng: says how to load a checkpoint, but no --load"),
    (dict(load="x", finetune=True, override_opt_param_scheduler=True),
     "--finetune with --override-opt_param-scheduler: contradictory"),
])
def test_validation(kw, msg):
    with pytest.raises(SatDistError) as e:
        TrainConfig(**kw).validate()
    assert msg in str(e.value)


def test_default_decay_may_be_shorter_than_warmup():
    """Only an explicit --lr-decay-iters is held to >= warmup: a short run with the default
    warmup (10) stays valid and warms up throughout."""
    t = TrainConfig(train_iters=6).validate()
    assert [schedule_of(t)(k) for k in range(3)] == pytest.approx([0.0, t.lr / 10, 2 * t.lr / 10])
