"""FAB and Square (jaxdiff.robust.fab / .square) and the full standard AutoAttack list, against independent truth:
closed-form hyperplane projections and scipy's LP / QP solvers, the exact minimal-norm point of a linear model,
the reference's p schedule and window pattern listed by hand, Square's monotone acceptance, and the driver's
"each stage on the still-robust points" on a small random MLP."""
import warnings

import numpy as np
import pytest
from scipy.optimize import linprog, minimize

import jax
import jax.numpy as jnp

from jaxdiff.robust import autoattack as aa_mod
from jaxdiff.robust import fab as fab_mod
from jaxdiff.robust import square as sq_mod
from test_attacks import mlp
from test_attacks import mlp_data as _mlp_data

EPS_TOL = 1e-5  # float32 slack on ||x_adv - x|| <= eps


# --- models ---------------------------------------------------------------------------------------------------

def mlp_data(f, n=24, n_wrong=3):
    """test_attacks' inputs and labels at this file's batch size."""
    return _mlp_data(f, n=n, n_wrong=n_wrong)


def sizes(v, norm):
    v = np.asarray(v).reshape(v.shape[0], -1)
    return np.abs(v).max(1) if norm == 'Linf' else np.sqrt((v ** 2).sum(1))


def in_ball(x_adv, x, eps, norm):
    xa = np.asarray(x_adv)
    return bool(np.all(sizes(x_adv - x, norm) <= eps + EPS_TOL) and xa.min() >= 0 and xa.max() <= 1)


# --- the hyperplane projections -------------------------------------------------------------------------------

STEPS = {'Linf': fab_mod.hyperplane_step_linf, 'L2': fab_mod.hyperplane_step_l2}


def step(norm, t, w, b):
    return np.asarray(jax.jit(STEPS[norm])(jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32),
                                  jnp.asarray(b, jnp.float32)))


def test_hyperplane_steps_closed_form_without_box():
    # Hand case: t = (0.5, 0.5, 0.5), w = (1, 2, 0), b = 1.2: w.t - b = 0.3, ||w||_1 = 3, ||w||_2^2 = 5.
    t, w, b = [[0.5, 0.5, 0.5]], [[1.0, 2.0, 0.0]], [1.2]
    np.testing.assert_allclose(step('Linf', t, w, b), [[-0.1, -0.1, 0.0]], atol=1e-6)
    np.testing.assert_allclose(step('L2', t, w, b), [[-0.06, -0.12, 0.0]], atol=1e-6)
    # The other side of the hyperplane (w.t - b = -0.3): same steps, opposite sign.
    np.testing.assert_allclose(step('Linf', t, w, [1.8]), [[0.1, 0.1, 0.0]], atol=1e-6)
    np.testing.assert_allclose(step('L2', t, w, [1.8]), [[0.06, 0.12, 0.0]], atol=1e-6)
    # Random interior points close to their hyperplane: the box is inactive, the closed forms hold.
    rng = np.random.default_rng(0)
    t = rng.uniform(0.3, 0.7, (16, 20))
    w = rng.normal(size=(16, 20))
    gap = rng.uniform(-0.05, 0.05, 16)
    b = (w * t).sum(1) - gap
    np.testing.assert_allclose(step('Linf', t, w, b), -gap[:, None] * np.sign(w) / np.abs(w).sum(1, keepdims=True),
                               atol=2e-6)
    np.testing.assert_allclose(step('L2', t, w, b), -gap[:, None] * w / (w ** 2).sum(1, keepdims=True), atol=2e-6)


def _scipy_linf(t, w, b):
    """min tau s.t. |d_i| <= tau, w.(t + d) = b, 0 <= t + d <= 1 (variables d, tau) -> tau, or None."""
    n = t.size
    a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None],
                  b_eq=[b - w @ t], bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)])
    return res.fun if res.status == 0 else None


def _scipy_l2(t, w, b):
    """argmin ||d||_2 s.t. w.(t + d) = b, 0 <= t + d <= 1, by SLSQP."""
    res = minimize(lambda d: d @ d, np.zeros(t.size), jac=lambda d: 2 * d, method='SLSQP',
                   bounds=[(-ti, 1 - ti) for ti in t],
                   constraints=[{'type': 'eq', 'fun': lambda d: w @ (t + d) - b, 'jac': lambda d: w}],
                   options={'ftol': 1e-14, 'maxiter': 500})
    assert res.success
    return res.x


def test_hyperplane_steps_with_box_match_scipy():
    rng = np.random.default_rng(1)
    n_box_active = n_infeasible = 0
    for _ in range(16):
        t = rng.uniform(0, 1, 5)
        w = rng.normal(size=5)
        b = w @ t + 1.5 * rng.normal()  # wide enough that some rows have no point of the box on the plane
        d_inf, d_2 = step('Linf', t[None], w[None], [b])[0], step('L2', t[None], w[None], [b])[0]
        for d in (d_inf, d_2):
            assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
        tau = _scipy_linf(t, w, b)
        if tau is None:  # no point of the box on the hyperplane: both go to the corner that gets closest
            n_infeasible += 1
            s = np.sign(w @ t - b) * np.sign(w)
            corner = np.where(s > 0, -t, 1 - t)
            np.testing.assert_allclose(d_inf, corner, atol=1e-6)
            np.testing.assert_allclose(d_2, corner, atol=1e-6)
            continue
        assert abs(w @ (t + d_inf) - b) < 1e-5 and abs(w @ (t + d_2) - b) < 1e-5
        assert np.abs(d_inf).max() == pytest.approx(tau, abs=1e-5)  # the Linf minimiser is not unique: its norm is
        d_ref = _scipy_l2(t, w, b)
        np.testing.assert_allclose(d_2, d_ref, atol=1e-5)
        n_box_active += bool(np.any(np.isclose(t + d_ref, 0, atol=1e-7) | np.isclose(t + d_ref, 1, atol=1e-7)))
    assert n_box_active >= 3 and n_infeasible >= 1  # the cases exercise the box and the infeasible branch


def test_solve_capped_sum_hand_values():
    # h(s) = 1 min(s, 0.2) + 2 min(s, 0.5): h(0.2) = 0.6, h(0.5) = 1.2 = sup.
    v, q = jnp.array([[1.0, 2.0]] * 4), jnp.array([[0.2, 0.5]] * 4)
    s = fab_mod.solve_capped_sum(v, q, jnp.array([0.0, 0.3, 0.8, 1.3]))
    np.testing.assert_allclose(np.asarray(s[:3]), [0.0, 0.1, 0.3], atol=1e-6)  # 0.8 = 0.2 + 2 s
    assert np.isinf(float(s[3]))


# --- FAB ------------------------------------------------------------------------------------------------------

def _linear_4class(x):
    """logits = flatten(x) W + bias with class 1 just behind class 0 at every x, classes 2, 3 far below.
    -> (logits_fn, the boundary normal v = w_1 - w_0 (D,), f(x) = z_1 - z_0 (B,))."""
    w = jax.random.normal(jax.random.key(5), (x[0].size, 4)) * 0.1
    v = w[:, 1] - w[:, 0]
    xf = x.reshape(x.shape[0], -1)
    bias = jnp.array([0.0, -float(jnp.max(xf @ v)) - 0.03, -5.0, -5.0])
    f = lambda z: z.reshape(z.shape[0], -1) @ w + bias
    logits = f(x)
    return f, v, logits[:, 1] - logits[:, 0]


@pytest.mark.parametrize('norm', ['Linf', 'L2'])
def test_fab_finds_minimal_norm_point_of_linear_model(norm):
    x = jax.random.uniform(jax.random.key(4), (4, 4, 4, 1), minval=0.4, maxval=0.6)
    f, v, gap = _linear_4class(x)
    y = jnp.zeros(4, jnp.int32)
    assert bool(jnp.all(gap < 0))
    # Closed form: the boundary z_1 = z_0 is the hyperplane v.z + gap(x) - v.x = 0, reached from x by
    # -gap sign(v) / ||v||_1 (Linf) or -gap v / ||v||_2^2 (L2); the box is inactive (x is 0.4 from its faces).
    dual = jnp.sum(jnp.abs(v)) if norm == 'Linf' else jnp.sum(v ** 2)
    d_star = (-gap[:, None] * (jnp.sign(v) if norm == 'Linf' else v) / dual).reshape(x.shape)
    dist = sizes(d_star, norm)
    assert float(jnp.max(jnp.abs(d_star))) < 0.3
    for targeted in (True, False):  # the nearest boundary is also class 1's, so FAB finds the same point
        res = jax.jit(lambda x, y: fab_mod.fab(f, x, y, 1.0, key=jax.random.key(0), norm=norm, targeted=targeted,
                                               n_target_classes=1))(x, y)
        found = np.asarray(res.adv_norm)
        # FAB overshoots by eta = 1.05 and backs off by beta; its best point converges to within 1% of the boundary.
        assert np.all(found >= dist * (1 - 1e-4)) and np.all(found <= dist * 1.01), (found / dist)
        np.testing.assert_allclose(sizes(res.x_adv - x, norm), found, rtol=1e-5)
        # The point is on the ray of the closed-form step: x + (found / dist) d*.
        np.testing.assert_allclose(np.asarray(res.x_adv - x), np.asarray(d_star) * (found / dist)[:, None, None, None],
                                   atol=2e-5)
        assert np.all(np.asarray(jnp.argmax(f(res.x_adv), -1)) == 1)
        np.testing.assert_array_equal(res.robust, dist > 1.0)  # eps = 1 is far larger: all fooled


@pytest.mark.parametrize('norm,eps', [('Linf', 0.01), ('L2', 0.1)])
def test_fab_bookkeeping_active_and_eps(norm, eps):
    f = mlp()
    x, y = mlp_data(f)
    active = jnp.arange(x.shape[0]) % 2 == 0
    res = jax.jit(lambda x, y: fab_mod.fab(f, x, y, eps, key=jax.random.key(1), norm=norm, n_iter=20,
                                           n_restarts=2, n_target_classes=2, active=active))(x, y)
    clean_correct = np.asarray(jnp.argmax(f(x), -1) == y)
    norms = np.asarray(res.adv_norm)
    act = np.asarray(active)
    # Not attacked (inactive or wrong on x): x back, no adversarial norm; robust = clean prediction correct.
    skip = ~act | ~clean_correct
    np.testing.assert_array_equal(np.asarray(res.x_adv)[skip], np.asarray(x)[skip])
    assert np.all(np.isinf(norms[skip]))
    np.testing.assert_array_equal(np.asarray(res.robust)[~act], clean_correct[~act])
    # Attacked: robust exactly when no adversarial point within eps; found points are adversarial, in [0, 1], and
    # their norms are the reported ones.
    att = act & clean_correct
    np.testing.assert_array_equal(np.asarray(res.robust)[att], ~(norms[att] <= eps))
    found = att & np.isfinite(norms)
    assert found.sum() >= 3 and (~np.asarray(res.robust) & att).sum() >= 1
    assert np.all(np.asarray(jnp.argmax(f(res.x_adv), -1) != y)[found])
    np.testing.assert_allclose(sizes(res.x_adv - x, norm)[found], norms[found], rtol=1e-5)
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1


# --- Square ---------------------------------------------------------------------------------------------------

def test_p_selection_matches_reference_table():
    # fra31/auto-attack square.py, p_selection with p_init = 0.8, hand-listed: p_init for it <= 10, then halved
    # after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (strictly greater).
    table = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 500: 0.1, 501: 0.05, 1000: 0.05,
             1001: 0.025, 2000: 0.025, 2001: 0.0125, 4000: 0.0125, 4001: 0.00625, 4999: 0.00625}
    for it, p in table.items():  # AutoAttack's setting: not rescaled
        assert sq_mod.p_selection(it, 5000) == pytest.approx(p), it
    # Rescaled (the class's default): it -> int(it / 5000 * 10000), 2 it up to float rounding (6 -> 11).
    rescaled = {5: 0.8, 6: 0.4, 25: 0.4, 26: 0.2, 100: 0.2, 101: 0.1, 250: 0.1, 251: 0.05, 500: 0.05, 501: 0.025,
                1000: 0.025, 1001: 0.0125, 2000: 0.0125, 2001: 0.00625, 3000: 0.00625, 3001: 0.003125,
                4000: 0.003125, 4001: 0.0015625, 4999: 0.0015625}
    for it, p in rescaled.items():
        assert sq_mod.p_selection(it, 5000, rescale=True) == pytest.approx(p), it
    # Window sides on 32 x 32: round(sqrt(p * 1024)); Linf >= 1; L2 >= 3 and odd.
    assert sq_mod.window_side(0.8, 32, 32, 'Linf') == 29 and sq_mod.window_side(0.05, 32, 32, 'Linf') == 7
    assert sq_mod.window_side(0.0125, 32, 32, 'L2') == 5 and sq_mod.window_side(0.001, 32, 32, 'L2') == 3
    assert sq_mod.window_side(0.8, 8, 8, 'L2') == 7 and sq_mod.window_side(0.8, 4, 4, 'Linf') == 4


def test_l2_window_pattern_by_hand():
    # s = 3: top row (one row of concentric rectangles around its centre) 1 + 1/4 at the centre, 1/4 around;
    # bottom two rows: -(1/4) everywhere plus -1 at their centre (row 1 of the block, column 1).
    top = np.array([0.25, 1.25, 0.25]) / np.sqrt(0.25 ** 2 * 2 + 1.25 ** 2)
    bottom = -np.array([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]]) / np.sqrt(0.25 ** 2 * 5 + 1.25 ** 2)
    want = np.vstack([top, bottom])
    np.testing.assert_allclose(sq_mod.l2_window(3), want / np.linalg.norm(want), atol=1e-12)
    assert np.linalg.norm(sq_mod.l2_window(7)) == pytest.approx(1.0)


@pytest.mark.parametrize('norm,eps', [('Linf', 0.02), ('L2', 0.2)])
def test_square_monotone_in_ball_and_box(norm, eps):
    f = mlp()
    x, y = mlp_data(f)
    active = jnp.arange(x.shape[0]) != 5
    res = jax.jit(lambda x, y: sq_mod.square(f, x, y, eps, key=jax.random.key(3), norm=norm, n_queries=150,
                                             active=active, trace=True))(x, y)
    trace = np.asarray(res.margin_trace)
    assert trace.shape == (150, x.shape[0])
    assert np.all(np.diff(trace, axis=0) <= 0)  # the best margin never increases
    assert in_ball(res.x_adv, x, eps, norm)
    margin = np.asarray(sq_mod._margin(f(res.x_adv), y))
    attacked = np.asarray(active & (jnp.argmax(f(x), -1) == y))
    np.testing.assert_allclose(margin[attacked], np.asarray(res.margin)[attacked], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.robust)[attacked], margin[attacked] > 0)
    np.testing.assert_array_equal(np.asarray(res.x_adv)[~attacked], np.asarray(x)[~attacked])
    fooled = attacked & ~np.asarray(res.robust)
    assert fooled.sum() >= 1 and (attacked & np.asarray(res.robust)).sum() >= 1
    q = np.asarray(res.n_queries)
    assert np.all(q[~attacked] == 0) and np.all(q[attacked & np.asarray(res.robust)] == 151)
    assert np.all(q[fooled] <= 151)


@pytest.mark.parametrize('norm,eps', [('Linf', 0.05), ('L2', 0.5)])
def test_square_fools_linear_model_with_margin_gap(norm, eps):
    kw, kx = jax.random.split(jax.random.key(6))
    w = jax.random.normal(kw, (64, 2))
    x = jax.random.uniform(kx, (8, 8, 8, 1), minval=0.2, maxval=0.8)
    dw = w[:, 1] - w[:, 0]
    # Move the points onto one level set of dw (a shift of about 0.05 per pixel), so all have the same margin.
    xf = x.reshape(8, -1)
    x = (xf + (jnp.mean(xf @ dw) - xf @ dw)[:, None] * dw / jnp.sum(dw ** 2)).reshape(x.shape)
    reach = eps * (jnp.sum(jnp.abs(dw)) if norm == 'Linf' else jnp.sqrt(jnp.sum(dw ** 2)))
    # Bias so that every point's margin is 30% of the largest decrease a perturbation in the ball can make.
    bias1 = -jnp.max(x.reshape(8, -1) @ dw) - 0.3 * reach
    f = lambda z: z.reshape(z.shape[0], -1) @ w + jnp.array([0.0, bias1])
    y = jnp.zeros(8, jnp.int32)
    assert bool(jnp.all(jnp.argmax(f(x), -1) == 0)) and float(x.min()) > 0.1 and float(x.max()) < 0.9
    res = jax.jit(lambda x, y: sq_mod.square(f, x, y, eps, key=jax.random.key(0), norm=norm, n_queries=300))(x, y)
    assert not bool(jnp.any(res.robust))
    assert bool(jnp.all(jnp.argmax(f(res.x_adv), -1) == 1))
    assert in_ball(res.x_adv, x, eps, norm)


# --- AutoAttack with the full standard list -------------------------------------------------------------------

def test_standard_list_order_and_no_upper_bound_warning():
    f = mlp()
    x, y = mlp_data(f, n=4)
    names = [n for n, _ in aa_mod.standard_attacks(0.01, 'Linf', n_classes=10)]
    assert tuple(names) == aa_mod.STANDARD_ORDER == ('apgd-ce', 'apgd-t', 'fab-t', 'square')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        out = jax.eval_shape(lambda x, y: aa_mod.autoattack(f, x, y, 0.01, key=jax.random.key(0)), x, y)
    assert set(out.robust_accuracy) == {'clean', *names}


def _switchable(attack, on):
    """The stage when ``on`` (a traced bool), else a stage that fools nobody (returns x)."""
    def run(logits_fn, x, y, key, active):
        return jax.lax.cond(on, lambda: attack(logits_fn, x, y, key, active), lambda: x)
    return run


@pytest.mark.parametrize('norm,eps', [('Linf', 0.006)])
def test_autoattack_full_list_never_above_any_single_stage(norm, eps):
    f = mlp()
    x, y = mlp_data(f)
    key = jax.random.key(9)
    stages = aa_mod.standard_attacks(eps, norm, n_classes=10, n_iter=4, n_queries=60)
    seen = []  # (stage index, active, output) of every call

    def spied(i, attack):
        def run(logits_fn, x, y, key, active):
            out = attack(logits_fn, x, y, key, active)
            jax.debug.callback(lambda a, o: seen.append((i, np.asarray(a), np.asarray(o))), active, out)
            return out
        return run

    # One program for the full list and for each stage alone: ``enabled`` switches stages off. A stage keeps its
    # position in the list, hence its key, so alone it attacks each point exactly as in the full run.
    run = jax.jit(lambda x, y, enabled: aa_mod.autoattack(
        f, x, y, eps, norm, key=key, attacks=[(n, _switchable(spied(i, a), enabled[i]))
                                              for i, (n, a) in enumerate(stages)]))
    full = run(x, y, jnp.ones(4, bool))
    jax.effects_barrier()
    acc = {k: float(v) for k, v in full.robust_accuracy.items()}
    assert acc['clean'] == pytest.approx(21 / 24)
    assert acc['clean'] > acc['apgd-ce'] and acc['square'] > 0  # not trivial: some points fooled, some survive
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]

    # Each stage is offered exactly the points still robust and leaves the others at x.
    robust = np.asarray(jnp.argmax(f(x), -1) == y)
    for i, active, out in seen:
        np.testing.assert_array_equal(active, robust)
        np.testing.assert_array_equal(out[~active], np.asarray(x)[~active])
        cand = aa_mod.project(jnp.asarray(out), x, eps, norm)
        robust = robust & ~(np.asarray(jnp.argmax(f(cand), -1) != y) & active)
    np.testing.assert_array_equal(full.robust, robust)
    assert in_ball(full.x_adv, x, eps, norm)

    # Any single stage alone leaves a superset of the full run's robust points; each fools some on its own.
    for i, name in enumerate(aa_mod.STANDARD_ORDER):
        single = run(x, y, jnp.arange(4) == i)
        assert acc['square'] <= float(single.robust_accuracy['square']) < acc['clean'], name
        assert not np.any(np.asarray(full.robust) & ~np.asarray(single.robust)), name


# --- jit ------------------------------------------------------------------------------------------------------

def test_fab_and_square_trace_once_loops_not_unrolled():
    f = mlp()
    x, y = mlp_data(f, n=4)
    traces = [0]

    def counted(z):
        traces[0] += 1  # runs only while tracing
        return f(z)

    def count(attack, n):
        traces[0] = 0
        jax.make_jaxpr(lambda x, y: attack(n, x, y))(x, y)
        return traces[0]

    attacks = {
        'fab-t': lambda n, x, y: fab_mod.fab(counted, x, y, 0.05, key=jax.random.key(0), n_iter=n, n_restarts=2,
                                             n_target_classes=3).x_adv,
        'fab': lambda n, x, y: fab_mod.fab(counted, x, y, 0.5, key=jax.random.key(0), norm='L2', n_iter=n,
                                           targeted=False, n_restarts=3).x_adv,
        'square-linf': lambda n, x, y: sq_mod.square(counted, x, y, 0.05, key=jax.random.key(0),
                                                     n_queries=n).x_adv,
        'square-l2': lambda n, x, y: sq_mod.square(counted, x, y, 0.5, key=jax.random.key(0), norm='L2',
                                                   n_queries=n).x_adv,
    }
    for name, attack in attacks.items():
        assert count(attack, 3) == count(attack, 40), name
