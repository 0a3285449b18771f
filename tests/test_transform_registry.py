"""jaxdiff.transforms.registry (sample.py --guidance NAME:key=value): each registered name builds the transform a
hand-written call builds (same outputs through a solver), the solver's grid is read off the solver itself, and bad
specs end in one message naming the problem."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff import transforms as T
from jaxdiff.sampling import options
from jaxdiff.solvers import ddim_sampler
from jaxdiff.solvers.plan import EvaluationPlan
from jaxdiff.transforms import registry
from jaxdiff.transforms.attribute_switching import attribute_switch

LABELS = 10
SHAPE = (4, 4, 4, 1)
W = jax.random.normal(jax.random.key(7), (int(np.prod(SHAPE[1:])), LABELS))


def logits(x, sigma):  # a stand-in noise-conditional classifier: linear in x, sharper at low noise
    scale = 1.0 / (1.0 + jnp.reshape(jnp.asarray(sigma, jnp.float32), (-1, 1)))
    return scale * (x.reshape(x.shape[0], -1) @ W)


logits.num_classes = LABELS
REFS = np.asarray(jax.random.uniform(jax.random.key(3), (6,) + SHAPE[1:], minval=-1, maxval=1))


def denoiser(x, sigma, cond=None):  # shrinks to a class-dependent mean
    shift = 0.0 if cond is None else 0.3 * (cond @ jnp.arange(LABELS, dtype=jnp.float32))[:, None, None, None]
    return x / (1 + jnp.reshape(sigma, (-1, 1, 1, 1)) ** 2) + shift


def worse(x, sigma, cond=None):  # a guide: shrinks less, ignores the class
    return x / (1 + 0.7 * jnp.reshape(sigma, (-1, 1, 1, 1)) ** 2)


def context(grid, ddim_eta=0.0, guide=worse):
    levels = np.asarray(grid[:-1], np.float64)  # a plan of one evaluation per step
    plan = EvaluationPlan(levels, np.arange(len(levels), dtype=np.int32), levels)
    return registry.Context(LABELS, 0.002, 80.0, plan=lambda: plan, ddim_eta=ddim_eta,
                            load_classifier=lambda run: logits, load_images=lambda path: REFS,
                            load_guide=lambda run, step: guide)


def by_hand(grid):
    """name -> (spec arguments, the same transform built by hand)."""
    one_hot = lambda k: jax.nn.one_hot(jnp.array([k]), LABELS)  # noqa: E731
    # The registry reads the classifier at the solver's sigma_min as the clean-image classifier of x0_hat.
    density = T.classifier_density(lambda z: logits(z, 0.002), [3, 4])
    threshold = T.calibrate_threshold(REFS, 2.0, float(grid[-2]), jax.random.key(6), margin=0.5)
    return {
        'cfg': ('weight=2,schedule="linear",negative=1,negative_weight=0.5',
                T.cfg(2.0, schedule='linear', negative=one_hot(1), negative_weight=0.5)),
        'classifier': ('run="r",scale=2', T.classifier_guidance(T.class_log_prob(logits, LABELS), 2.0)),
        'safe_classifier': ('run="r",unsafe=(3,4),scale=2', T.safe_classifier_guidance(logits, [3, 4], LABELS, 2.0)),
        'unguidance': ('run="r",unsafe=(3,4),gamma=3,eta=0.1,gamma_schedule="invlinear",seed_update=True',
                       T.unguidance(density, 3.0, 0.1, 'invlinear', grid=grid, ddim_eta=0.0)),
        'negative_classifier': ('run="r",unsafe=(3,4),scale=0.1',
                                T.negative_classifier_guidance(lambda z: jnp.log(jnp.maximum(density(z), 1e-30)),
                                                               0.1)),
        'sld': ('concept=3,preset="STRONG",guidance_scale=1.0', T.sld(one_hot(3), 'STRONG', 1.0, sigmas=grid)),
        'safe_denoiser': ('refs="refs.npz",scale=0.5,bandwidth=2.0,window_steps=4,margin=0.5,seed=5',
                          T.practical_safe_denoiser(REFS, 0.5, 2.0, threshold, grid=grid, window_steps=4,
                                                    ddim_eta=0.0, key=jax.random.key(5))),
        'attribute_switch': ('from=2,to=8,tau=1.5', attribute_switch(one_hot(2), one_hot(8), 1.5)),
        'autoguidance': ('guide="g",weight=2.5,interval=0.5:5',
                         T.autoguidance(worse, 2.5, interval=T.GuidanceInterval(0.5, 5.0, np.asarray(grid[:-1])))),
    }


def test_every_registered_transform_is_its_hand_build():
    grid = schedules.ddpm_sigmas(8)
    hand = by_hand(grid)
    assert set(hand) == set(registry.REGISTRY)
    z = jax.random.normal(jax.random.key(0), SHAPE)
    cond = jax.nn.one_hot(jnp.array([0, 3, 5, 9]), LABELS)
    plain = ddim_sampler(denoiser, z, cond=cond, sigmas=grid)
    for name, (args, transform) in hand.items():
        name_, kwargs = options.parse_transform(f'{name}:{args}')
        built = registry.build(name_, kwargs, context(grid))
        got = ddim_sampler(built(denoiser), z, cond=cond, sigmas=grid)
        want = ddim_sampler(transform(denoiser), z, cond=cond, sigmas=grid)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=name)
        assert float(jnp.abs(got - plain).max()) > 1e-4, f'{name} changed nothing'


def test_solver_grid_is_the_grid_the_solver_runs_on():
    edm = options.resolve_solver('edm', {'num_steps': 6}, (0.002, 80.0))
    np.testing.assert_allclose(options.solver_grid(options.make_solver('edm', edm)), schedules.karras_sigmas(6),
                               rtol=1e-6)
    ddim = options.resolve_solver('ddim', {'num_steps': 10}, (0.002, 80.0))
    np.testing.assert_allclose(options.solver_grid(options.make_solver('ddim', ddim)), schedules.ddpm_sigmas(10),
                               rtol=1e-6)


def test_bad_specs_name_the_problem(tmp_path):
    ctx = context(schedules.ddpm_sigmas(8))
    with pytest.raises(ValueError, match="unknown transform 'cgf'.*cfg"):
        registry.build('cgf', {}, ctx)
    with pytest.raises(ValueError, match="transform cfg: unknown key 'wieght' \\(did you mean 'weight'\\?\\)"):
        registry.build('cfg', {'wieght': 2}, ctx)
    with pytest.raises(ValueError, match="unknown key 'gama' \\(did you mean 'gamma'\\?\\); it takes run, unsafe"):
        registry.build('unguidance', {'run': 'r', 'unsafe': 1, 'gama': 3}, ctx)  # before the run is read
    with pytest.raises(ValueError, match="unknown key 'strength'; it takes concept, preset, guidance_scale, "
                                         'warmup_steps'):
        registry.build('sld', {'concept': 3, 'strength': 2}, ctx)
    for options_, match in (({'num_steps': 0}, 'num_steps=0 is out of range .* an integer >= 1'),
                            ({'S_churn': -1.0}, 'S_churn=-1.0 is out of range .* >= 0'),
                            ({'sigma_min': 5.0, 'sigma_max': 1.0}, 'sigma_min=5.0 must be below --sigma_max=1.0')):
        with pytest.raises(ValueError, match=match):
            options.resolve_solver('edm', options_, (0.002, 80.0))
    with pytest.raises(ValueError, match=r'unsafe=11 must be a class index'):
        registry.build('safe_classifier', {'run': 'r', 'unsafe': 11}, ctx)
    with pytest.raises(ValueError, match=r'concept=\(3, 4\) must be one class index'):
        registry.build('sld', {'concept': (3, 4)}, ctx)
    with pytest.raises(ValueError, match='needs tau=SIGMA'):
        registry.build('attribute_switch', {'from': 1, 'to': 2}, ctx)
    with pytest.raises(ValueError, match='class-conditional'):
        registry.build('sld', {'concept': 3}, ctx._replace(label_dim=0))
    edm = options.resolve_solver('edm', {}, (0.002, 80.0))
    with pytest.raises(FileNotFoundError, match='np.savez'):
        options.make_transform([f'safe_denoiser:refs="{tmp_path}/none.npz"'], LABELS, 'edm', edm, (0.002, 80.0))
    np.savez(tmp_path / 'refs.npz', images=np.zeros((3, 4, 4, 1), np.uint8))
    transform, described = options.make_transform([f'safe_denoiser:refs="{tmp_path}/refs.npz"', '2'], LABELS, 'ddim',
                                                  options.resolve_solver('ddim', {}, (0.002, 80.0)), (0.002, 80.0))
    assert callable(transform) and [d['name'] for d in described] == ['safe_denoiser', 'cfg']
