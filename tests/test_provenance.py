"""Detection by reconstruction: the ODE path inverts and reconstructs on an exact Gaussian-mixture denoiser to an
error that shrinks with steps, and DIRE / the loss statistic separate a model's own samples from images of
another distribution."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import toy
from jaxdiff.evaluation import provenance as prov
from jaxdiff.sampling.model import Model
from jaxdiff.solvers.ode_path import inversion_grid, ode_path


def _mixture():
    means = 1.5 * jax.random.normal(jax.random.key(1), (4, 16))
    return toy.mixture(means, 0.3)


def test_inversion_then_reconstruction_error_shrinks_with_steps():
    gm = _mixture()
    x, _ = toy.sample(gm, jax.random.key(2), 128)
    heun = [r['rms'] for r in prov.round_trip_error(toy.denoiser(gm), x, (20, 80, 160), order=2)]
    assert heun[0] > 3 * heun[1] > 3 * 3 * heun[2] and heun[2] < 5e-4  # second order: ~4x per doubling
    # Euler (DDIM) converges slowly: a few points still land in another mode after a 40-step round trip
    euler = [r['rms'] for r in prov.round_trip_error(toy.denoiser(gm), x, (10, 40, 160))]
    assert euler[0] > euler[1] > euler[2] > 50 * heun[2]


def test_ode_path_goes_to_the_noise_and_the_grid_is_checked():
    gm = _mixture()
    x, _ = toy.sample(gm, jax.random.key(3), 512)
    grid = inversion_grid(40, 0.002, 80.0)
    assert grid[0] == pytest.approx(0.002) and grid[-1] == pytest.approx(80.0) and np.all(np.diff(grid) > 0)
    noise = ode_path(toy.denoiser(gm), x, grid, order=2) / 80.0  # the ODE carries the data to N(0, I) at sigma_max
    assert abs(float(jnp.std(noise)) - 1) < 0.05
    with pytest.raises(ValueError, match='monotone'):
        ode_path(toy.denoiser(gm), x, [0.5, 1.0, 0.7])
    with pytest.raises(ValueError, match='positive'):
        ode_path(toy.denoiser(gm), x, [0.0, 1.0])


def _to_uint8(x):
    return np.clip(np.round((np.asarray(x) + 1) * 127.5), 0, 255).astype(np.uint8)


def test_dire_and_loss_tell_the_models_samples_from_other_images(tmp_path):
    model_gm = toy.mixture(0.5 * jnp.sign(jax.random.normal(jax.random.key(4), (3, 4, 4, 1))), 0.05)
    other_gm = toy.mixture(0.6 * jax.random.uniform(jax.random.key(5), (3, 4, 4, 1), minval=-1), 0.3)
    model = Model(net=None, variables={}, denoiser=lambda v: toy.denoiser(model_gm), resolution=4, channels=1,
                  label_dim=0, sigma_range=(0.002, 80.0), description=dict(kind='mixture'))
    fake = _to_uint8(toy.sample(model_gm, jax.random.key(6), 48)[0])
    real = _to_uint8(toy.sample(other_gm, jax.random.key(7), 48)[0])
    result = prov.detect(model, dict(images=real, labels=None), {'samples': dict(images=fake, labels=None)},
                         num_steps=20, sigmas=(0.1, 0.3), draws=2, log=lambda m: None)
    rows = {r['statistic']: r for r in result['rows']}
    assert rows['dire']['auc'] > 0.9 and rows['loss']['auc'] > 0.9
    # DIRE of the model's own samples is the solver's round-trip error only
    assert -result['scores']['dire']['samples'].mean() < -result['scores']['dire']['real'].mean() / 3
    record = prov.write_detection(result, str(tmp_path))
    assert json.load(open(tmp_path / 'provenance.json'))['rows'] == json.loads(json.dumps(record['rows']))
    for name in ('provenance_roc.png', 'dire_maps.png', 'provenance_scores.npz'):
        assert (tmp_path / name).is_file()
