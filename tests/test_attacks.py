"""Adversarial attacks (jaxdiff.robust) against independent truth: closed forms on linear models, hand-computed
loss tables and checkpoint schedules, a replay of APGD's step-size rule, and the ball / box / bookkeeping
invariants on a small fixed nonlinear model."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdiff.robust import apgd as apgd_mod
from jaxdiff.robust import autoattack as aa_mod
from jaxdiff.robust import losses
from jaxdiff.robust import pgd as pgd_mod

EPS_TOL = 1e-6  # float32 slack on ||x_adv - x|| <= eps


# --- models ---------------------------------------------------------------------------------------------------

def linear_model(seed=0, d=8 * 8, k=2):
    """logits = flatten(x) W + b."""
    kw, kb = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(kw, (d, k)) * 0.1  # small: CE gradients far from float32 underflow
    b = jax.random.normal(kb, (k,))
    return w, (lambda x: x.reshape(x.shape[0], -1) @ w + b)


def mlp(seed=1, k=10):
    """A fixed random 2-layer MLP on 8x8x1 inputs, nonlinear enough that step-size control matters."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w1 = jax.random.normal(k1, (64, 32)) * 1.0
    b1 = jax.random.normal(k3, (32,))
    w2 = jax.random.normal(k2, (32, k)) * 0.7
    return lambda x: jnp.sin(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2


def mlp_data(f, n=32, seed=2, n_wrong=4):
    """Inputs in [0, 1]; labels = the model's predictions except the first n_wrong, which are made wrong."""
    x = jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1))
    y = jnp.argmax(f(x), -1)
    return x, y.at[:n_wrong].set((y[:n_wrong] + 1) % 10)


def in_ball(x_adv, x, eps, norm):
    d = np.asarray(x_adv - x).reshape(x.shape[0], -1)
    size = np.abs(d).max(1) if norm == 'Linf' else np.sqrt((d ** 2).sum(1))
    return bool(np.all(size <= eps + EPS_TOL) and np.all(np.asarray(x_adv) >= 0) and np.all(np.asarray(x_adv) <= 1))


# --- PGD closed forms -----------------------------------------------------------------------------------------

def _linear_setup(eps):
    w, f = linear_model()
    x = jax.random.uniform(jax.random.key(3), (6, 8, 8, 1), minval=eps, maxval=1 - eps)  # interior of the box
    y = jnp.array([0, 1, 0, 1, 1, 0])
    # CE of a 2-class linear model increases with (w_other - w_y) . x, so the optimum is on the ball's boundary in
    # that direction.
    d = (w[:, 1 - y] - w[:, y]).T.reshape(x.shape)
    return f, x, y, d


def test_pgd_linf_linear_closed_form():
    eps = 0.05
    f, x, y, d = _linear_setup(eps)
    expected = x + eps * jnp.sign(d)
    np.testing.assert_allclose(pgd_mod.fgsm(f, x, y, eps), expected, atol=1e-6)
    # From a random start, 20 steps of eps/4 cross the whole cube (5 eps >= 2 eps), so PGD ends on the corner.
    out = pgd_mod.pgd(f, x, y, eps, key=jax.random.key(0), n_steps=20, step_size=eps / 4)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # The margin loss has the same maximiser.
    out = pgd_mod.pgd(f, x, y, eps, key=jax.random.key(1), n_steps=20, step_size=eps / 4, loss='margin')
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_pgd_l2_linear_closed_form():
    eps = 0.5
    f, x, y, d = _linear_setup(0.1)
    unit = d / jnp.sqrt(jnp.sum(d ** 2, axis=(1, 2, 3), keepdims=True))
    expected = x + eps * unit
    np.testing.assert_allclose(pgd_mod.fgsm(f, x, y, eps, norm='L2'), expected, atol=1e-6)
    # From a random start the off-direction part halves at every step of length eps.
    out = pgd_mod.pgd(f, x, y, eps, key=jax.random.key(0), norm='L2', n_steps=40, step_size=eps)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_pgd_keep_best_and_kl():
    f = mlp()
    x, y = mlp_data(f)
    eps = 0.1

    @jax.jit
    def run(x, y):
        kw = dict(key=jax.random.key(0), n_steps=8, step_size=0.08)
        return (pgd_mod.pgd(f, x, y, eps, **kw), pgd_mod.pgd(f, x, y, eps, keep_best=True, **kw),
                pgd_mod.pgd(f, x, y, eps, key=jax.random.key(0), n_steps=5, loss='kl'))

    last, best, adv = run(x, y)
    assert np.all(losses.cross_entropy(f(best), y) >= losses.cross_entropy(f(last), y) - 1e-6)
    assert in_ball(adv, x, eps, 'Linf')
    assert float(jnp.mean(losses.kl_divergence(f(x), f(adv)))) > 0.01


# --- losses ---------------------------------------------------------------------------------------------------

LOGITS = jnp.array([[3.0, 1.0, 0.5, -1.0],
                    [0.0, 2.0, 1.0, 4.0]])
LABELS = jnp.array([0, 1])


def test_losses_hand_values():
    # Row 0: correct, runner-up 1, sorted 3 > 1 > 0.5 > -1.  Row 1: wrong (class 3 wins), sorted 4 > 2 > 1 > 0.
    np.testing.assert_allclose(losses.margin(LOGITS, LABELS), [-2.0, 2.0])
    np.testing.assert_allclose(losses.dlr(LOGITS, LABELS), [-(3 - 1) / (3 - 0.5), -(2 - 4) / (4 - 1)], rtol=1e-6)
    t = jnp.array([2, 3])
    np.testing.assert_allclose(losses.dlr_targeted(LOGITS, LABELS, t),
                               [-(3 - 0.5) / (3 - (0.5 - 1) / 2), -(2 - 4) / (4 - (1 + 0) / 2)], rtol=1e-6)
    z = np.asarray(LOGITS, np.float64)
    lse = np.log(np.exp(z).sum(1))
    np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS), lse - z[[0, 1], [0, 1]], rtol=1e-6)
    q = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0]])
    p_c = np.exp(z - lse[:, None])
    p_a = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    np.testing.assert_allclose(losses.kl_divergence(LOGITS, jnp.asarray(q, jnp.float32)),
                               (p_c * np.log(p_c / p_a)).sum(1), rtol=1e-5)
    np.testing.assert_allclose(losses.kl_divergence(LOGITS, LOGITS), [0.0, 0.0], atol=1e-6)
    # The true class tied with the top: max over the *other* classes is that tie, so DLR = margin = 0.
    tie = jnp.array([[2.0, 2.0, 0.0]])
    np.testing.assert_allclose(losses.dlr(tie, jnp.array([0])), [0.0], atol=1e-7)


def test_dlr_shift_and_scale_invariance():
    z = jax.random.normal(jax.random.key(0), (16, 10)) * 3
    y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    t = (y + 3) % 10
    for a, c in [(0.1, 5.0), (7.0, -3.0)]:
        np.testing.assert_allclose(losses.dlr(a * z + c, y), losses.dlr(z, y), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(losses.dlr_targeted(a * z + c, y, t), losses.dlr_targeted(z, y, t),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='K >= 4'):
        losses.dlr_targeted(z[:, :3], y % 3, t % 3)


# --- APGD step-size rule --------------------------------------------------------------------------------------

def test_checkpoint_schedule_hand_computed():
    assert apgd_mod.checkpoint_schedule(100) == (22, 41, 57, 70, 80, 87, 93, 99)
    # The paper's recurrence p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), p_0 = 0, p_1 = 0.22, gives the same.
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert tuple(round(100 * q) for q in p[1:]) == apgd_mod.checkpoint_schedule(100)
    assert apgd_mod.checkpoint_schedule(10) == (2, 3, 4, 5, 6, 7, 8, 9, 10)  # every interval floored at 1


def test_count_increases_and_halving_rule_branches():
    # Five samples (columns), one interval of k = 4 steps after a start loss of 0.
    seq = jnp.array([[1., 1., 1., 1., 1.],
                     [2., 2., 2., 2., 2.],
                     [1., 3., 3., 3., 3.],
                     [3., 4., 4., 4., 4.]])
    n_inc = apgd_mod.count_increases(seq, jnp.zeros(5))
    np.testing.assert_array_equal(n_inc, [3, 4, 4, 4, 4])
    halved_last = jnp.array([True, True, False, True, False])
    best = jnp.array([3., 4., 4., 4., 4.])
    best_last = jnp.array([0., 0., 4., 4., 1.])
    got = apgd_mod.should_halve(n_inc, 4, halved_last, best, best_last)
    # 0: 3 increases <= 0.75 * 4 -> halve (oscillation branch, boundary included as in the reference).
    # 1: 4 increases, halved last time -> keep.
    # 2: 4 increases, not halved last time and best unchanged -> halve (stall branch).
    # 3: best unchanged but halved last time -> keep.
    # 4: not halved last time but best improved -> keep.
    np.testing.assert_array_equal(got, [True, False, True, False, False])


def test_halving_decisions_replay_by_hand():
    # n_iter = 10: checkpoints after 2, 3, ..., 10 iterations (intervals 2, 1, 1, ...).
    trace = jnp.array([1., 2., 3., 3., 5., 4., 4., 4.5, 4.8, 7.])[:, None]
    got = np.asarray(apgd_mod.halving_decisions(trace, jnp.array([0.])))[:, 0]
    # t=2: 2 increases of 2 > 1.5 -> keep.        t=3: 1 of 1 -> keep.   t=4: 0 of 1 -> halve (oscillation).
    # t=5: 1 of 1, halved last -> keep (best 5).  t=6: 0 of 1 -> halve.  t=7: 0 of 1 -> halve.
    # t=8: 1 of 1, halved last -> keep.           t=9: 1 of 1, but not halved last and best still 5 -> halve
    # (stall).                                     t=10: 1 of 1, halved last -> keep.
    np.testing.assert_array_equal(got, [False, False, True, False, True, True, False, True, False])


@pytest.mark.parametrize('norm,eps', [('Linf', 0.05), ('L2', 0.5)])
def test_apgd_run_follows_rule_and_keeps_best(norm, eps):
    f = mlp()
    x, y = mlp_data(f)
    key = jax.random.key(5)
    n_iter = 30
    run = jax.jit(lambda x, y: apgd_mod.apgd_run(f, x, y, eps, losses.cross_entropy, key, norm=norm,
                                                 n_iter=n_iter))(x, y)
    x0 = apgd_mod.reference_start(key, x, eps, norm)
    loss0 = losses.cross_entropy(f(x0), y)
    # The step sizes the run used are 2 eps halved exactly where the rule, replayed on its own losses, says.
    decisions = np.asarray(apgd_mod.halving_decisions(run.loss_trace, loss0))
    steps = np.full(x.shape[0], 2 * eps)
    expected = np.empty((n_iter, x.shape[0]))
    checks = dict((t - 1, j) for j, t in enumerate(apgd_mod.checkpoint_schedule(n_iter)))
    for k in range(n_iter):
        if k in checks:
            steps = np.where(decisions[checks[k]], steps / 2, steps)
        expected[k] = steps
    np.testing.assert_allclose(run.step_trace, expected, rtol=1e-6)
    assert decisions.any() and not decisions.all()
    # Best-point bookkeeping: the best loss is the running maximum, and x_best attains it.
    np.testing.assert_allclose(run.loss_best, np.maximum(loss0, run.loss_trace.max(0)), rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(f(run.x_best), y), run.loss_best, rtol=1e-4, atol=1e-5)
    assert in_ball(run.x_best, x, eps, norm) and in_ball(run.x_adv, x, eps, norm)


# --- attacks on the nonlinear model ---------------------------------------------------------------------------

@pytest.mark.parametrize('norm,eps', [('Linf', 0.05), ('L2', 0.5)])
def test_all_attacks_stay_in_ball_and_box(norm, eps):
    f = mlp()
    x, y = mlp_data(f)
    key = jax.random.key(0)

    @jax.jit
    def run(x, y):
        return [pgd_mod.fgsm(f, x, y, eps, norm=norm),
                pgd_mod.pgd(f, x, y, eps, key=key, norm=norm, n_steps=5),
                apgd_mod.apgd(f, x, y, eps, key=key, norm=norm, n_iter=10, n_restarts=2, loss='dlr').x_adv,
                apgd_mod.apgd_targeted(f, x, y, eps, key=key, norm=norm, n_iter=10, n_target_classes=3).x_adv]

    for out in run(x, y):
        assert in_ball(out, x, eps, norm)


def test_apgd_beats_pgd_and_bookkeeping():
    f = mlp()
    x, y = mlp_data(f, n=64)
    eps = 0.02

    @jax.jit
    def run(x, y):
        res = apgd_mod.apgd(f, x, y, eps, key=jax.random.key(0), n_iter=100)
        # PGD with the same budget (100 gradients), Madry's step 2.5 eps / n and a larger one; best point kept.
        advs = [pgd_mod.pgd(f, x, y, eps, key=jax.random.key(0), n_steps=100, step_size=s, keep_best=True)
                for s in (None, eps / 4)]
        return res, [losses.cross_entropy(f(a), y) for a in advs]

    res, pgd_losses = run(x, y)
    for pgd_loss in pgd_losses:
        assert float(jnp.mean(res.loss_best)) >= float(jnp.mean(pgd_loss))
    # The reported flags agree with the classifier on the returned points, and clean mistakes stay clean.
    correct = np.asarray(jnp.argmax(f(res.x_adv), -1) == y)
    np.testing.assert_array_equal(np.asarray(res.robust), correct)
    assert not np.any(res.robust[:4])
    np.testing.assert_array_equal(res.x_adv[:4], x[:4])
    assert 0 < int(res.robust.sum()) < 60  # the attack fooled some of the 60 clean-correct samples, not all


def test_restarts_keep_first_adversarial_and_targets():
    f = mlp()
    x, y = mlp_data(f)
    eps = 0.03
    one, three = jax.jit(lambda x, y: [apgd_mod.apgd(f, x, y, eps, key=jax.random.key(0), n_iter=10, n_restarts=n)
                                       for n in (1, 3)])(x, y)
    fooled_first = np.array(~one.robust)
    fooled_first[:4] = False  # clean mistakes: x itself in both
    assert fooled_first.any()
    np.testing.assert_array_equal(three.x_adv[fooled_first], one.x_adv[fooled_first])
    assert np.all(np.asarray(three.robust) <= np.asarray(one.robust))  # more restarts never un-fool a sample
    # Targets: the 2nd, 3rd, 4th largest clean logits.
    z = jnp.array([[0.1, 5.0, 3.0, 4.0, 1.0]])
    np.testing.assert_array_equal(apgd_mod.target_classes(z, 3)[:, 0], [3, 2, 4])
    with pytest.raises(ValueError, match='n_target_classes'):
        apgd_mod.target_classes(z, 5)


# --- AutoAttack driver ----------------------------------------------------------------------------------------

def test_autoattack_runs_stages_on_still_robust_points():
    f = mlp()
    x, y = mlp_data(f)
    eps, key = 0.02, jax.random.key(7)
    seen = []

    def spy(logits_fn, x, y, key, active):  # records which points it is asked to attack, fools none
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), active)
        return x

    def ce(logits_fn, x, y, key, active):
        return apgd_mod.apgd(logits_fn, x, y, eps, key=key, n_iter=10, active=active).x_adv

    def targeted(logits_fn, x, y, key, active):
        return apgd_mod.apgd_targeted(logits_fn, x, y, eps, key=key, n_iter=10, n_target_classes=3,
                                      active=active).x_adv

    stages = [('apgd-ce', ce), ('spy', spy), ('apgd-t', targeted)]
    res = jax.jit(lambda x, y: aa_mod.autoattack(f, x, y, eps, key=key, attacks=stages))(x, y)
    alone = apgd_mod.apgd(f, x, y, eps, key=jax.random.fold_in(key, 0), n_iter=10)
    # The second stage is offered exactly the points the first one (run alone) left robust.
    np.testing.assert_array_equal(seen[0], alone.robust)
    acc = {k: float(v) for k, v in res.robust_accuracy.items()}
    assert set(acc) == {'clean', 'apgd-ce', 'spy', 'apgd-t'}
    assert acc['clean'] == pytest.approx(28 / 32) and acc['spy'] == acc['apgd-ce'] >= acc['apgd-t']
    assert acc['apgd-ce'] < acc['clean']
    np.testing.assert_array_equal(res.robust, jnp.argmax(f(res.x_adv), -1) == y)
    assert acc['apgd-t'] == pytest.approx(float(jnp.mean(res.robust)))
    np.testing.assert_array_equal(res.x_adv[:4], x[:4])
    assert in_ball(res.x_adv, x, eps, 'Linf')


# --- jit ------------------------------------------------------------------------------------------------------

def test_attacks_compile_once_with_loops_not_unrolled():
    f = mlp()
    x, y = mlp_data(f, n=8)
    traces = [0]

    def counted(z):
        traces[0] += 1  # runs only while tracing
        return f(z)

    def count(attack, n, compile_=False):
        traces[0] = 0
        fn = lambda x, y, key: attack(n, x, y, key)
        if not compile_:
            jax.make_jaxpr(fn)(x, y, jax.random.key(0))  # tracing only
            return traces[0]
        fn = jax.jit(fn)
        jax.block_until_ready(fn(x, y, jax.random.key(0)))
        first = traces[0]
        jax.block_until_ready(fn(x * 0.9, (y + 1) % 10, jax.random.key(1)))
        assert traces[0] == first  # no retrace for new values of the same shape
        return first

    attacks = {
        'pgd': lambda n, x, y, k: pgd_mod.pgd(counted, x, y, 0.05, key=k, n_steps=n),
        'apgd': lambda n, x, y, k: apgd_mod.apgd(counted, x, y, 0.05, key=k, n_iter=n, n_restarts=2).x_adv,
        'apgd_t': lambda n, x, y, k: apgd_mod.apgd_targeted(counted, x, y, 0.05, key=k, n_iter=n,
                                                            n_target_classes=2).x_adv,
    }
    for name, attack in attacks.items():
        # The model is traced the same number of times whatever the iteration count: loops are lax loops.
        assert count(attack, 3, compile_=True) == count(attack, 12), name
