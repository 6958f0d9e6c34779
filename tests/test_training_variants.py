"""Training variants selected by config: COT and PGD adversarial training."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gce_jax import data, losses, parallel, train
from gce_jax.attacks import pgd
from gce_jax.models import logits_fn
from test_parallel import (B, assert_trees_close, config_for, make_models, max_abs_diff,
                           plain_update, random_batch, run_step)
from test_train import DATA, one_device, tiny_config

SHAPE = (8, 8, 3)


def test_cot_complement_objective_matches_reference_formula():
    # Reference COT: softmax p, q_j = p_j / (1 - p_g) over j != g,
    # loss = mean_batch(sum_j q_j log q_j) / K -- minimised, <= 0.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
    y = rng.integers(0, 10, 6)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = p / (1 - p[np.arange(6), y])[:, None]
    mask = np.ones_like(p, bool)
    mask[np.arange(6), y] = False
    ref = np.mean(np.sum(np.where(mask, q * np.log(q), 0.0), -1)) / 10
    c = config_for()
    c.training.method = "cot"
    fn = train.create_complement_objective(c, 10)
    got = float(jnp.mean(fn(jnp.asarray(logits), jnp.asarray(y))))
    assert got < 0
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    c.training.cot.complement_normalization = "log_k_minus_1"
    got = float(jnp.mean(train.create_complement_objective(c, 10)(logits, y)))
    np.testing.assert_allclose(got, ref * 10 / np.log(9), rtol=1e-5)


def test_cot_step_is_two_sequential_updates_with_separate_optimizer_states():
    config = config_for()
    config.training.method = "cot"
    model, plain_model = make_models("resnet8")
    tx = train.create_optimizer(config, steps_per_epoch=10)
    tx_comp = train.create_optimizer(config, steps_per_epoch=10)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = jax.device_get(train.create_train_state(config, model, tx, SHAPE, mesh1,
                                                 tx_comp=tx_comp))
    # Give both momentum buffers a history, so "separate states" is visible.
    batch0, batch = random_batch(SHAPE, seed=1), random_batch(SHAPE, seed=2)
    s0, _ = run_step(config, model, tx, s0, batch0, 1, tx_comp=tx_comp)

    s1, m1 = run_step(config, model, tx, s0, batch, 1, tx_comp=tx_comp)
    s4, m4 = run_step(config, model, tx, s0, batch, 4, tx_comp=tx_comp)

    # By hand: an XE update, then -- at the new params and BN statistics -- a
    # complement-entropy update with the second optimizer state.
    upd = jax.jit(plain_update, static_argnums=(0, 1, 2))
    x, y = batch["image"], batch["label"]
    p1, bs1, o1, xe = upd(plain_model, tx, losses.cross_entropy, s0.params, s0.batch_stats,
                          s0.opt_state, x, y)
    p2, bs2, c2, comp = upd(plain_model, tx_comp, train.create_complement_objective(config, 10),
                            p1, bs1, s0.comp_opt_state, x, y)
    for s in (s1, s4):
        assert_trees_close(s.params, p2)
        assert_trees_close(s.batch_stats, bs2)
        assert_trees_close(s.opt_state, o1)
        assert_trees_close(s.comp_opt_state, c2)
    np.testing.assert_allclose(m1["loss_sum"], xe, rtol=1e-5)
    np.testing.assert_allclose(m4["comp_loss_sum"], comp, rtol=1e-5)
    # BatchNorm statistics moved in both passes (bs2 != bs1 != bs0).
    assert max_abs_diff(bs1, s0.batch_stats) > 1e-4 and max_abs_diff(bs2, bs1) > 1e-4
    # Two optimizer states: distinct objects, distinct momentum values.
    assert s1.opt_state is not s1.comp_opt_state
    assert max_abs_diff(s1.opt_state, s1.comp_opt_state) > 1e-4
    # The second update matters: params differ from the XE-only update.
    assert max_abs_diff(s1.params, p1) > 1e-5


def _adv_config(**adv):
    c = config_for()
    a = c.training.adversarial
    a.enabled, a.eps, a.steps, a.step_size, a.random_start, a.mix = True, 0.1, 3, 0.05, False, 0.0
    for k, v in adv.items():
        a[k] = v
    return c


def test_adversarial_step_attacks_in_inference_mode_and_matches_on_four_devices():
    config = _adv_config()
    model, _ = make_models("resnet8")
    tx = train.create_optimizer(config, steps_per_epoch=10)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = jax.device_get(train.create_train_state(config, model, tx, SHAPE, mesh1))
    # One natural step first, so the running statistics differ from their init.
    s0, _ = run_step(config_for(), model, tx, s0, random_batch(SHAPE, seed=3), 1)
    batch = random_batch(SHAPE, seed=4)

    s_adv, m_adv = run_step(config, model, tx, s0, batch, 1)
    s_adv4, _ = run_step(config, model, tx, s0, batch, 4)
    assert_trees_close(s_adv4.params, s_adv.params)
    assert_trees_close(s_adv4.batch_stats, s_adv.batch_stats)

    # The attack itself: PGD on XE against the model with running statistics.
    x_adv = np.asarray(jax.jit(lambda v, x, y: train.adversarial_inputs(
        model, v, x, y, key=jax.random.PRNGKey(0), adv=config.training.adversarial))(
            s0.variables, batch["image"], batch["label"]))
    ref = pgd(logits_fn(model, s0.variables), batch["image"], batch["label"],
              key=jax.random.PRNGKey(0), eps=0.1, steps=3, step_size=0.05, random_start=False)
    np.testing.assert_allclose(x_adv, np.asarray(ref), atol=1e-6)
    assert 0.05 < np.max(np.abs(x_adv - batch["image"])) <= 0.1 + 1e-6

    # The adversarial step equals a natural step on those examples: the only
    # BatchNorm update is the training pass's (the attack changed nothing).
    s_nat, m_nat = run_step(config_for(), model, tx, s0, {**batch, "image": x_adv}, 1)
    assert_trees_close(s_adv.batch_stats, s_nat.batch_stats)
    assert_trees_close(s_adv.params, s_nat.params)
    np.testing.assert_allclose(m_adv["loss_sum"], m_nat["loss_sum"], rtol=1e-5)
    # ... and differs from a natural step on the clean batch.
    s_clean, _ = run_step(config_for(), model, tx, s0, batch, 1)
    assert max_abs_diff(s_clean.batch_stats, s_adv.batch_stats) > 1e-4


@pytest.mark.parametrize("mix", [0.0, 0.4])
def test_adversarial_step_with_random_start_matches_on_four_devices(mix):
    # Random starts and natural rows are keyed by the global example index,
    # not the device (mix=0.4: shards hold 1 or 2 natural rows of 4).
    config = _adv_config(random_start=True, mix=mix)
    model, _ = make_models("resnet8")
    tx = train.create_optimizer(config, steps_per_epoch=10)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = jax.device_get(train.create_train_state(config, model, tx, SHAPE, mesh1))
    batch = random_batch(SHAPE, seed=5)
    s1, m1 = run_step(config, model, tx, s0, batch, 1)
    s4, m4 = run_step(config, model, tx, s0, batch, 4)
    assert_trees_close(s4.params, s1.params)
    assert_trees_close(s4.batch_stats, s1.batch_stats)
    np.testing.assert_allclose(m4["loss_sum"], m1["loss_sum"], rtol=1e-5)
    # The start is random: another step key gives another update.
    s_other, _ = run_step(config, model, tx, s0.replace(key=jax.random.PRNGKey(123)), batch, 1)
    assert max_abs_diff(s_other.params, s1.params) > 1e-7


def test_pgd_shards_draw_the_whole_batch_random_starts():
    fn = lambda x: jnp.reshape(x, (x.shape[0], -1))[:, :3] * 10.0  # noqa: E731
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 4, 4, 1))
    y = jnp.arange(8) % 3
    kw = dict(key=jax.random.PRNGKey(7), eps=0.1, steps=0, random_start=True)
    whole = pgd(fn, x, y, **kw)
    halves = jnp.concatenate([pgd(fn, x[:4], y[:4], **kw),
                              pgd(fn, x[4:], y[4:], example_offset=4, **kw)])
    np.testing.assert_array_equal(np.asarray(halves), np.asarray(whole))
    assert not np.array_equal(np.asarray(pgd(fn, x[4:], y[4:], **kw)), np.asarray(whole[4:]))
    # One index per example: a subset that is not contiguous.
    idx = np.array([6, 1, 3])
    some = pgd(fn, x[idx], y[idx], example_offset=jnp.asarray(idx), **kw)
    np.testing.assert_array_equal(np.asarray(some), np.asarray(whole)[idx])
    with pytest.raises(ValueError, match="example_offset"):
        pgd(fn, x[idx], y[idx], example_offset=jnp.arange(2), **kw)


@pytest.mark.parametrize("mix,size", [(0.25, 16), (0.4, 16), (0.3, 64), (1 / 3, 100)])
def test_natural_rows_are_spread_evenly_and_split_invariant(mix, size):
    nat = np.asarray(train.natural_rows(jnp.arange(size), mix))
    assert nat.sum() == int(np.floor(size * mix + 1e-9))
    # Every block of consecutive indices holds floor or ceil of its share.
    for n in (4, 5, 8):
        counts = [nat[i:i + n].sum() for i in range(size - n + 1)]
        assert min(counts) >= np.floor(n * mix) and max(counts) <= np.ceil(n * mix)
    parts = [np.asarray(train.natural_rows(o + jnp.arange(8), mix)) for o in range(0, size, 8)]
    np.testing.assert_array_equal(np.concatenate(parts)[:size], nat)


def test_adversarial_mix_keeps_the_chosen_rows_natural():
    config = _adv_config(mix=0.4, random_start=True)
    model, _ = make_models("lenet5")
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    tx = train.create_optimizer(config, 10)
    s0 = train.create_train_state(config, model, tx, (28, 28, 1), mesh1)
    b = random_batch((28, 28, 1))
    nat = np.asarray(train.natural_rows(jnp.arange(len(b["label"])), 0.4))
    x, y = jnp.asarray(b["image"]), jnp.asarray(b["label"])
    kw = dict(key=jax.random.PRNGKey(0), adv=config.training.adversarial)
    out = np.asarray(train.adversarial_inputs(model, s0.variables, x, y, **kw))
    d = np.abs(out - b["image"]).reshape(len(out), -1).max(-1)
    assert nat.sum() == 6 and np.all(d[nat] == 0) and np.all(d[~nat] > 0.05)
    # A shard (rows 4..7: two natural rows, two attacked plus a natural one
    # as padding) gives the rows the whole batch gave them.
    part = train.adversarial_inputs(model, s0.variables, x[4:8], y[4:8], example_offset=4, **kw)
    np.testing.assert_array_equal(np.asarray(part), out[4:8])


def test_adversarial_eps_warmup_ramps_radius_and_step_together():
    scale = [float(train.adversarial_eps_scale(jnp.asarray(s), 4)) for s in (0, 1, 3, 9)]
    assert scale == [0.25, 0.5, 1.0, 1.0]
    assert float(train.adversarial_eps_scale(jnp.asarray(0), 0)) == 1.0

    model, _ = make_models("lenet5")
    mesh = parallel.make_mesh(jax.devices()[:1])
    warm = _adv_config(eps_warmup_epochs=1.0)  # 4 steps/epoch: step 0 uses 1/4
    small = _adv_config(eps=0.1 / 4, step_size=0.05 / 4)
    tx = train.create_optimizer(warm, 4)
    s0 = jax.device_get(train.create_train_state(warm, model, tx, (28, 28, 1), mesh))
    batch = random_batch((28, 28, 1), seed=5)

    def step(config):
        fn = train.make_train_step(config, model, tx, mesh, 10, steps_per_epoch=4)
        out, _ = fn(parallel.replicate(s0, mesh),
                    parallel.replicate(train.init_train_metrics(), mesh),
                    parallel.shard_batch(batch, mesh))
        return jax.device_get(out)

    assert_trees_close(step(warm).params, step(small).params)
    assert max_abs_diff(step(warm).params, step(_adv_config()).params) > 1e-6
    with pytest.raises(train.ConfigError, match="steps_per_epoch"):
        train.make_train_step(warm, model, tx, mesh, 10)
    with pytest.raises(train.ConfigError, match="eps_warmup_epochs"):
        train.validate_config(_adv_config(eps_warmup_epochs=-1))


def test_adversarial_training_raises_pgd_accuracy(tmp_path):
    tr = data.resize_dataset(data.load_split("digits", "train"), (28, 28))
    te = data.resize_dataset(data.load_split("digits", "test"), (28, 28))
    eps = 0.1

    def run(adversarial: bool):
        c = tiny_config(dataset="digits", loss="xe", epochs=2, batch_size=64,
                        eval_batch_size=360, selection="last", log_every_steps=100)
        c.data.val_size = 0
        if adversarial:
            a = c.training.adversarial
            a.enabled, a.eps, a.steps, a.step_size, a.random_start = True, eps, 2, 1.25 * eps, True
        wd = str(tmp_path / ("adv" if adversarial else "nat"))
        result = train.train_and_evaluate(c, wd, datasets=train.Datasets(tr, None, te),
                                          mesh=one_device())
        model, variables, _ = train.load_for_eval(wd)
        x, y = te.images.astype(np.float32) / 255, te.labels
        x_adv = pgd(logits_fn(model, variables), x, y, key=jax.random.PRNGKey(1),
                    eps=eps, steps=10, step_size=eps / 4)
        robust = float(np.mean(np.argmax(model.apply(variables, x_adv), -1) == y))
        return result["test_acc"], robust

    nat_clean, nat_robust = run(False)
    adv_clean, adv_robust = run(True)
    assert nat_clean > 0.85 and adv_clean > 0.75
    # Measured: natural ~0.25, adversarial ~0.49 under PGD-10 at eps 0.1.
    assert adv_robust > nat_robust + 0.15, (nat_robust, adv_robust)


@pytest.mark.parametrize("variant", ["cot", "adversarial"])
def test_resume_is_bit_identical(variant, tmp_path):
    def cfg(epochs):
        c = tiny_config(epochs=epochs)
        if variant == "cot":
            c.loss, c.training.method = "xe", "cot"
        else:
            a = c.training.adversarial
            a.enabled, a.eps, a.steps, a.step_size = True, 0.1, 2, 0.05
            a.random_start, a.mix = True, 0.25
        return c

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r_full = train.train_and_evaluate(cfg(2), full, datasets=DATA, mesh=one_device())
    train.train_and_evaluate(cfg(1), part, datasets=DATA, mesh=one_device())
    r_part = train.train_and_evaluate(cfg(2), part, datasets=DATA, mesh=one_device())
    _, v_full, _ = train.load_for_eval(full, "last")
    _, v_part, _ = train.load_for_eval(part, "last")
    for a, b in zip(jax.tree.leaves(v_full), jax.tree.leaves(v_part)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert r_full["train_loss"] == r_part["train_loss"]
    if variant == "cot":
        assert "train_complement_loss" in r_full and r_full["train_complement_loss"] < 0


def test_cosine_schedule_with_linear_warmup():
    from experiments.configs import cifar10_cpu

    config = cifar10_cpu.get_config("xe")
    train.validate_config(config)
    steps = 100
    lr_fn = train.create_learning_rate_fn(config, steps)
    peak, warm = config.optimizer.learning_rate, int(config.lr_schedule.warmup_epochs * steps)
    assert float(lr_fn(0)) == 0.0
    np.testing.assert_allclose(float(lr_fn(warm // 2)), peak / 2, rtol=1e-5)
    np.testing.assert_allclose(float(lr_fn(warm)), peak, rtol=1e-5)
    assert float(lr_fn(config.epochs * steps)) < 1e-6 * peak
    lrs = [float(lr_fn(s)) for s in range(warm, config.epochs * steps, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically after warm-up
    config.lr_schedule.warmup_epochs = float(config.epochs)
    with pytest.raises(train.ConfigError, match="warmup_epochs"):
        train.validate_config(config)


# ---------------------------------------------------------------- step pieces
# A step is an input transform then an update (gce_jax.train.make_train_step);
# each piece runs per device, so these call them under a 'batch' shard_map.

class _Tiny(nn.Module):
    """Linear classifier: small enough to do its optimizer step by hand."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _per_device(fn, n_devices, out_specs):
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                            out_specs=out_specs)
    return lambda state, x, y: jax.device_get(jax.jit(sharded)(
        parallel.replicate(state, mesh), *(parallel.shard_batch({"v": v}, mesh)["v"]
                                           for v in (x, y))))


def test_natural_input_transform_is_identity():
    model, _ = make_models("lenet5")
    transform = train.make_input_transform(config_for(), model)
    assert transform is train.natural_inputs
    b = random_batch((28, 28, 1))
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = train.create_train_state(config_for(), model, train.create_optimizer(config_for(), 10),
                                  (28, 28, 1), mesh1)
    out = _per_device(transform, 4, P("batch"))(s0, b["image"], b["label"])
    np.testing.assert_array_equal(out, b["image"])


def test_adversarial_transform_keeps_the_natural_rows_of_the_mix():
    config = _adv_config(mix=0.25, random_start=True)
    model, _ = make_models("lenet5")
    transform = train.make_input_transform(config, model)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = train.create_train_state(config, model, train.create_optimizer(config, 10),
                                  (28, 28, 1), mesh1)
    b = random_batch((28, 28, 1), seed=6)
    x1 = _per_device(transform, 1, P("batch"))(s0, b["image"], b["label"])
    x4 = _per_device(transform, 4, P("batch"))(s0, b["image"], b["label"])
    np.testing.assert_array_equal(x4, x1)  # keyed by the global example index
    d = np.abs(x1 - b["image"]).reshape(B, -1).max(-1)
    nat = np.asarray(train.natural_rows(jnp.arange(B), 0.25))
    assert nat.sum() == 4 and np.all(d[nat] == 0)
    assert np.all(d[~nat] > 0.05) and np.all(d <= 0.1 + 1e-6)
    # The step's key: fold_in(state.key, state.step), so the next step differs.
    x_next = _per_device(transform, 1, P("batch"))(s0.replace(step=s0.step + 1),
                                                   b["image"], b["label"])
    assert np.abs(x_next - x1).max() > 0


def test_adversarial_objective_comes_from_the_attacks_registry():
    config = _adv_config(loss="margin")
    train.validate_config(config)
    model, _ = make_models("lenet5")
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = train.create_train_state(config, model, train.create_optimizer(config, 10),
                                  (28, 28, 1), mesh1)
    b = random_batch((28, 28, 1), seed=7)
    out = train.adversarial_inputs(model, s0.variables, b["image"], b["label"],
                                   key=jax.random.PRNGKey(0), adv=config.training.adversarial)
    ref = pgd(logits_fn(model, s0.variables), b["image"], b["label"],
              key=jax.random.PRNGKey(0), eps=0.1, steps=3, step_size=0.05,
              random_start=False, loss="margin")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    with pytest.raises(train.ConfigError, match=r"training.adversarial.loss='nope'.*'margin'"):
        train.validate_config(_adv_config(loss="nope"))


@pytest.mark.parametrize("n_devices", [1, 4])
def test_standard_update_equals_an_optax_step_by_hand(n_devices):
    config = config_for()
    model = _Tiny()
    tx = optax.sgd(0.1, momentum=0.9)
    mesh1 = parallel.make_mesh(jax.devices()[:1])
    s0 = jax.device_get(train.create_train_state(config, model, tx, (3, 2), mesh1))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 3, 2)).astype(np.float32)
    y = rng.integers(0, 10, B).astype(np.int32)
    update = train.make_update(config, model, tx, 10)
    assert update.func is train.standard_update
    out_specs = (P(), train.UpdateOutput(P(), P(), P(), P("batch"), P()))
    s1, out = _per_device(update, n_devices, out_specs)(s0, x, y)

    def loss(p):
        return jnp.mean(losses.cross_entropy(model.apply({"params": p}, x), y))

    value, grads = jax.value_and_grad(loss)(s0.params)
    updates, opt_state = tx.update(grads, s0.opt_state, s0.params)
    assert_trees_close(s1.params, optax.apply_updates(s0.params, updates), atol=1e-6)
    assert_trees_close(s1.opt_state, opt_state, atol=1e-6)
    np.testing.assert_allclose(out.loss, value, rtol=1e-6)
    np.testing.assert_allclose(out.grad_norm, optax.tree.norm(grads), rtol=1e-5)
    assert bool(out.ok) and float(out.comp_loss) == 0.0 and out.logits.shape == (B, 10)
    assert int(s1.step) == int(s0.step)  # train_step, not the update, counts steps


def test_update_follows_the_method():
    config = config_for()
    model, _ = make_models("lenet5")
    tx = train.create_optimizer(config, 10)
    assert train.make_update(config, model, tx, 10).func is train.standard_update
    config.training.method = "cot"
    cot = train.make_update(config, model, tx, 10, tx_comp=tx)
    assert cot.func is train.complement_update
    assert cot.keywords["primary"].func is train.standard_update
    with pytest.raises(train.ConfigError, match="tx_comp"):
        train.make_update(config, model, tx, 10)
