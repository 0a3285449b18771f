"""Latent datasets and latent diffusion: the folder format and its statistics, the pipeline's normalisation and
per-read posterior draws (the same global batch on 1 and 2 processes), the encode CLI, and a DiT trained on the
latents of a diffusers-format autoencoder that resumes bitwise and samples through the decoder into shards."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.config import base_config
from jaxdiff.data import encode, latents
from jaxdiff.data.pipeline import make_iterator
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.nets.autoencoder_kl import AutoencoderKL
from jaxdiff.nets.convert_autoencoder import to_diffusers
from jaxdiff.sampling.model import load_model
from jaxdiff.sampling.run import sample
from jaxdiff.sampling.shards import shard_path
from jaxdiff.tasks import registry

TINY_AE = dict(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 16), layers_per_block=1,
               norm_num_groups=4)


def data_config(path, **kw):
    data = base_config().data
    data.update(source='latents', path=str(path), **kw)
    return data


@pytest.fixture(scope='module')
def moments(tmp_path_factory):
    """A 'moments' folder of 40 random 2x2x3 latents with labels 0..3, in two shards."""
    rng = np.random.default_rng(0)
    mean = (rng.standard_normal((40, 2, 2, 3)) * [1.0, 2.0, 0.5] + [0.0, 3.0, -1.0]).astype(np.float32)
    std = rng.uniform(0.1, 0.5, (40, 2, 2, 3)).astype(np.float32)
    folder = tmp_path_factory.mktemp('moments')
    meta = latents.write_latents(str(folder), mean, std, np.arange(40) % 4, num_classes=4, autoencoder={},
                                 image_shape=(16, 16, 1), source={}, shard_size=25)
    return folder, mean, std, meta


def test_folder_statistics_and_normalisation(moments):
    folder, mean, std, meta = moments
    assert meta['shards'] == ['shard-00000.npz', 'shard-00001.npz'] and latents.read_meta(str(folder)) == meta
    # Total variance by brute force: many posterior draws of the whole dataset.
    draws = mean + std * np.random.default_rng(1).standard_normal((2000,) + mean.shape)
    np.testing.assert_allclose(meta['channel_mean'], draws.reshape(-1, 3).mean(0), atol=0.01)
    np.testing.assert_allclose(meta['channel_std'], draws.reshape(-1, 3).std(0), rtol=0.01)
    space = latents.space_of(meta)
    x = space.normalize(draws.reshape(-1, 3))
    np.testing.assert_allclose(x.std(0), 0.5, rtol=0.01)
    np.testing.assert_allclose(space.denormalize(x), draws.reshape(-1, 3), atol=1e-4)
    scaled = latents.space_of(dict(meta, normalization='scale'))
    np.testing.assert_allclose(scaled.normalize(mean), mean * meta['scaling_factor'])


def test_pipeline_draws_per_read_and_one_global_batch_for_any_process_count(moments):
    folder, mean, std, meta = moments
    config = data_config(folder)
    one, info = make_iterator(config, global_batch_size=8, seed=3)
    assert (info.resolution, info.channels, info.num_classes, info.size) == (2, 3, 4, 40)
    halves = [make_iterator(config, global_batch_size=8, seed=3, process_index=p, process_count=2)[0]
              for p in range(2)]
    space = latents.space_of(meta)
    for _ in range(6):  # past the first epoch: 5 batches of 8 per epoch
        batch = next(one)
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(batch['image'], np.concatenate([p['image'] for p in parts]))
        np.testing.assert_array_equal(batch['label'], np.concatenate([p['label'] for p in parts]))
        # Each row is a draw from its own record's posterior (found as the nearest in posterior units).
        for row, label in zip(space.denormalize(batch['image']), batch['label']):
            k = int(np.argmin(np.square((row - mean) / std).reshape(40, -1).sum(1)))
            assert label == k % 4 and np.all(np.abs(row - mean[k]) < 6 * std[k])
    first = [next(make_iterator(config, global_batch_size=8, seed=3)[0])['image'] for _ in range(2)]
    np.testing.assert_array_equal(*first)  # a function of (seed, step) alone


def test_sample_mode_unlabelled_and_refusals(tmp_path):
    z = np.random.default_rng(0).standard_normal((6, 4, 4, 2)).astype(np.float32)
    meta = latents.write_latents(str(tmp_path / 'lat'), z, None, np.zeros(6, np.int32), num_classes=0,
                                 autoencoder={}, image_shape=(8, 8, 1), source={})
    assert meta['mode'] == 'sample'
    it, info = make_iterator(data_config(tmp_path / 'lat'), global_batch_size=6, seed=0)
    batch = next(it)
    np.testing.assert_allclose(np.sort(batch['image'].ravel()),
                               np.sort(latents.space_of(meta).normalize(z).ravel()), rtol=1e-6)
    assert info.num_classes == 0 and not batch['label'].any()
    with pytest.raises(ValueError, match='latent of a mirrored image is not the mirrored latent'):
        make_iterator(data_config(tmp_path / 'lat', xflip=True), global_batch_size=6, seed=0)
    with pytest.raises(FileNotFoundError, match='python -m jaxdiff.data.encode'):
        make_iterator(data_config(tmp_path / 'missing'), global_batch_size=6, seed=0)


@pytest.fixture(scope='module')
def diffusers_vae(tmp_path_factory):
    """A tiny random AutoencoderKL saved as a diffusers folder (config.json + safetensors)."""
    from safetensors.numpy import save_file
    folder = tmp_path_factory.mktemp('vae')
    net = AutoencoderKL(**TINY_AE)
    variables = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    save_file(to_diffusers(variables), str(folder / 'diffusion_pytorch_model.safetensors'))
    config = dict(_class_name='AutoencoderKL', **{k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in TINY_AE.items()},
                  down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
                  scaling_factor=0.3)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder, net, variables


def test_encode_cli_equals_the_encoder(diffusers_vae, tmp_path, capsys):
    folder, net, variables = diffusers_vae
    out = tmp_path / 'digits_latents'
    assert encode.main(['--autoencoder', str(folder), '--data', 'digits', '--out', str(out), '--batch_size', '500']) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert meta['count'] == 1797 and meta['shape'] == [4, 4, 2] and meta['scaling_factor'] == 0.3
    stored = latents.read_meta(str(out))
    assert stored['autoencoder']['kind'] == 'diffusers' and stored['num_classes'] == 10
    from jaxdiff.data.sources import load_digits
    images, labels = load_digits()
    shard = np.load(out / 'shard-00000.npz')
    x = jnp.asarray(images[:7].reshape(7, 8, 8, 1), jnp.float32) / 127.5 - 1
    want_mean, want_logvar = net.apply(variables, x, method=net.encode)
    np.testing.assert_allclose(shard['mean'][:7], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shard['std'][:7], np.exp(0.5 * np.asarray(want_logvar)), rtol=1e-5)
    np.testing.assert_array_equal(shard['labels'], labels)
    with pytest.raises(FileExistsError, match='already holds latents'):  # a finished folder is never overwritten
        encode.encode_dataset(encode.parse_args(['--autoencoder', str(folder), '--data', 'digits', '--out', str(out)]))


def test_latent_dit_trains_resumes_bitwise_and_samples_images(diffusers_vae, tmp_path):
    folder, _, _ = diffusers_vae
    lat = tmp_path / 'latents'
    encode.main(['--autoencoder', str(folder), '--data', 'digits', '--out', str(lat)])
    config = base_config()
    config.update(batch_size=16, total_steps=4, checkpoint_every=2, log_every=2, sample_every=4)
    config.data.update(source='latents', path=str(lat))
    config.model.update(arch='dit', patch_size=2, hidden_size=32, depth=1, num_heads=4, label_dropout=0.1)
    config.loss.augment_p = 0.0
    config.optim.lr_rampup_img = 0
    config.sampling.update(num_images=10, num_steps=3)
    run = tmp_path / 'run'
    summary = registry.run(config, str(run))
    assert summary['step'] == 4 and os.path.isfile(run / 'samples' / 'step_0000004.png')
    resumed = tmp_path / 'resumed'
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '4')
    assert registry.run(config, str(resumed))['resumed_from'] == 2
    for key, value in ckpt.load_arrays(str(run)).items():
        jax.tree.map(np.testing.assert_array_equal, value, ckpt.load_arrays(str(resumed))[key])

    model = load_model(str(run))
    assert model.latent_shape == (4, 4, 2) and (model.resolution, model.channels) == (8, 1)
    sample(model, str(tmp_path / 'samples'), first=0, end=8, batch_size=8, solver_options={'num_steps': 3},
           log=lambda line: None)
    shard = np.load(shard_path(str(tmp_path / 'samples'), 0))
    assert shard['images'].shape == (8, 8, 8, 1) and shard['images'].dtype == np.uint8
    assert len(np.unique(shard['images'])) > 10  # decoded pixels, not a constant
