"""sample.py and jaxdiff.sampling: per-seed determinism (batch size, 1 vs 8 devices, 2 processes), kill -9 and
resume to the exact uninterrupted result, solver/transform options, filtering, converted EDM checkpoints, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import free_port, make_tiny_run, run_together, xla_flags
from jaxdiff import toy
from jaxdiff.sampling import filter as sfilter
from jaxdiff.sampling import generate as gen
from jaxdiff.sampling import options, run, shards
from jaxdiff.sampling.model import Model, load_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAST = ['--num_steps=3']


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """The tiny run directory with EMA != raw params and step 7."""
    return make_tiny_run(str(tmp_path_factory.mktemp('run')), ema_offset=0.01, step=7)


def sample_cli(env, *args, timeout=240, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def shard_bytes(folder):
    return {n: open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder)) if n.endswith('.npz')}


def test_per_seed_samples_ignore_batch_size(run_dir, tmp_path):
    model = load_model(run_dir)
    assert model.description['step'] == 7 and model.label_dim == 10 and model.resolution == 8
    a, b = tmp_path / 'a', tmp_path / 'b'
    run.sample(model, str(a), first=5, end=30, batch_size=8, shard_size=10, solver_options={'num_steps': 3})
    run.sample(model, str(b), first=5, end=30, batch_size=5, shard_size=10, solver_options={'num_steps': 3})
    assert shard_bytes(a) == shard_bytes(b)
    data = shards.load_samples(str(a))
    np.testing.assert_array_equal(data['seeds'], np.arange(5, 30))
    assert data['images'].dtype == np.uint8 and data['images'].shape == (25, 8, 8, 1)
    assert len(set(data['images'].reshape(25, -1).tobytes()[i * 64:(i + 1) * 64] for i in range(25))) == 25
    # a seed range inside another gives the same images for the shared seeds
    c = tmp_path / 'c'
    run.sample(model, str(c), first=12, end=17, batch_size=4, shard_size=100, solver_options={'num_steps': 3})
    np.testing.assert_array_equal(shards.load_samples(str(c))['images'], data['images'][7:12])
    manifest = json.load(open(a / 'manifest.json'))
    assert manifest['complete'] and [s['count'] for s in manifest['shards']] == [10, 10, 5]
    assert manifest['labels']['mode'] == 'random' and manifest['solver']['num_steps'] == 3


def test_autoguidance_by_the_model_itself_changes_no_sample(run_dir, tmp_path):
    """sample.py's autoguidance:guide=RUN loads the guide run; guided by itself the model is unchanged (D_g + w (D - D_g)
    with D_g = D), with the interval too; the manifest records the spec."""
    model = load_model(run_dir)
    common = dict(first=0, end=6, batch_size=6, shard_size=6, solver_options={'num_steps': 3}, log=lambda _: None)
    run.sample(model, str(tmp_path / 'plain'), **common)
    run.sample(model, str(tmp_path / 'auto'), transforms=[f'autoguidance:guide="{run_dir}",weight=2.5,step=7,'
                                                          'interval=0.5:20'], **common)
    assert shard_bytes(tmp_path / 'plain') == shard_bytes(tmp_path / 'auto')
    assert json.load(open(tmp_path / 'auto' / 'manifest.json'))['transforms'] == [
        dict(name='autoguidance', guide=run_dir, weight=2.5, step=7, interval='0.5:20')]


def test_labels_modes_follow_seeds():
    seeds = jax.numpy.arange(20, 40)
    balanced = jax.vmap(lambda s: gen.seed_label(s, gen.make_labels(10, class_balanced=True)))(seeds)
    np.testing.assert_array_equal(balanced, np.arange(20, 40) % 10)
    listed = jax.vmap(lambda s: gen.seed_label(s, gen.make_labels(10, labels='3,7')))(seeds)
    np.testing.assert_array_equal(listed, np.where(np.arange(20, 40) % 2 == 0, 3, 7))
    rand = np.asarray(jax.vmap(lambda s: gen.seed_label(s, gen.make_labels(10)))(jax.numpy.arange(2000)))
    assert rand.min() == 0 and rand.max() == 9 and np.all(np.bincount(rand) > 150)
    with pytest.raises(ValueError, match='unconditional'):
        gen.make_labels(0, class_balanced=True)
    with pytest.raises(ValueError, match='0..9'):
        gen.make_labels(10, labels='12')


def test_eight_devices_and_resume_after_kill(env, run_dir, tmp_path):
    """1 device vs 8 fake devices: same bytes. kill -9 mid-run, rerun: exactly N unique seeds, same bytes."""
    args = ['--workdir', run_dir, '--num_samples', 96, '--shard_size', 8, *FAST]
    one = sample_cli(env, *args, '--out', tmp_path / 'one', '--batch_size', 8, '--filter_memorized', 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f'model: kind train_run, path {os.path.abspath(run_dir)}, step 7, params ema' in one.stdout  # what it loaded
    # the memorisation filter searched the run's 1797 training digits; a 7-step model copies none of them
    filtered = json.load(open(tmp_path / 'one' / 'unmemorized' / 'manifest.json'))
    assert filtered['memorized_dropped'] == 0 and filtered['num_samples'] == 96 and filtered['min_l'] > 1
    assert '1,797 training images' in filtered['memorized_against']
    env8 = dict(env, XLA_FLAGS=xla_flags(8))
    eight = sample_cli(env8, *args, '--out', tmp_path / 'eight', '--batch_size', 16)
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert 'on 8 device(s)' in eight.stdout
    reference = shard_bytes(tmp_path / 'one')
    assert len(reference) == 12 and shard_bytes(tmp_path / 'eight') == reference

    out = tmp_path / 'killed'
    slow = [a if a != '--num_steps=3' else '--num_steps=40' for a in args]  # slow enough to be caught mid-run
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'sample.py'), *map(str, slow), '--out', str(out),
                             '--batch_size', '8'], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and len([n for n in os.listdir(out) if n.endswith('.npz')] if out.exists()
                                          else []) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = [n for n in os.listdir(out) if n.endswith('.npz')]
    assert 2 <= len(written) < 12, written  # interrupted mid-run
    assert not json.load(open(out / 'manifest.json'))['complete']
    rerun = sample_cli(env, *slow, '--out', out, '--batch_size', '8')
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f'{len(written)} of 12 shard(s) already complete' in rerun.stdout
    # the same bytes as an uninterrupted run (in this process: per-seed sampling does not depend on the caller)
    run.sample(load_model(run_dir), str(tmp_path / 'whole'), first=0, end=96, batch_size=8, shard_size=8,
               solver_options={'num_steps': 40})
    assert shard_bytes(out) == shard_bytes(tmp_path / 'whole')
    data = shards.load_samples(str(out))
    assert len(data['seeds']) == 96 and len(np.unique(data['seeds'])) == 96
    np.testing.assert_array_equal(data['seeds'], np.arange(96))
    assert not [n for n in os.listdir(out) if '.tmp-' in n]
    assert json.load(open(out / 'manifest.json'))['complete']


def test_two_processes_write_their_own_shards(env, run_dir, tmp_path):
    port = free_port()
    args = ['--workdir', run_dir, '--num_samples', 40, '--shard_size', 8, '--batch_size', 8, *FAST]
    results = run_together([[sys.executable, os.path.join(ROOT, 'sample.py'), *map(str, args), '--out',
                             str(tmp_path / 'multi'), f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                             f'--process_id={i}'] for i in range(2)], env, ROOT)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    outs = [(out, err) for _, out, err in results]
    assert '[process 1/2] 0 of 2 shard(s)' in outs[1][0] and '[process 0/2] 0 of 3 shard(s)' in outs[0][0]
    single = sample_cli(env, *args, '--out', tmp_path / 'single')
    assert single.returncode == 0, single.stderr[-2000:]
    assert shard_bytes(tmp_path / 'multi') == shard_bytes(tmp_path / 'single')
    assert json.load(open(tmp_path / 'multi' / 'manifest.json'))['complete']


def gmm_model(label_dim=2):
    """The exact denoiser of a 2-class 1-D-pixel mixture as a Model (no network)."""
    mix = toy.mixture(means=[[[[-0.6]]], [[[0.6]]]], stds=[0.05, 0.05], labels=[0, 1], num_classes=2)
    return Model(net=None, variables={}, denoiser=lambda v: toy.denoiser(mix), resolution=1, channels=1,
                 label_dim=label_dim, sigma_range=(0.0, float('inf')), description={'kind': 'gmm'})


def test_solvers_and_guidance_from_options(tmp_path):
    """Every solver runs from its name; class-balanced labels pick the mixture component; CFG by spec string."""
    model = gmm_model()
    for name in options.SOLVERS:
        settings = {'num_steps': 20} if 'num_steps' in options.solver_defaults(name) else {}
        out = tmp_path / name
        run.sample(model, str(out), first=0, end=8, batch_size=8, shard_size=8, solver=name, solver_options=settings,
                   labels=gen.make_labels(2, class_balanced=True), log=lambda _: None)
        data = shards.load_samples(str(out))
        sign = np.where(data['images'][:, 0, 0, 0] >= 128, 1, 0)
        np.testing.assert_array_equal(sign, data['labels'], err_msg=name)
    assert options.parse_transform('2.5') == ('cfg', {'weight': 2.5})
    assert options.parse_transform('cfg:weight=3,schedule=linear') == ('cfg', {'weight': 3, 'schedule': 'linear'})
    with pytest.raises(ValueError, match="takes no option S_churn"):
        options.resolve_solver('ddim', {'S_churn': 1.0}, (0.002, 80.0))
    assert options.resolve_solver('edm', {}, (0.01, 20.0))['sigma_max'] == 20.0
    edm = options.resolve_solver('edm', {}, (0.002, 80.0))
    with pytest.raises(ValueError, match='unknown transform'):
        options.make_transform(['slf:scale=1'], 2, 'edm', edm, (0.002, 80.0))
    with pytest.raises(ValueError, match='unconditional'):
        options.make_transform(['2'], 0, 'edm', edm, (0.002, 80.0))


def test_filter_keeps_top_fraction_per_class():
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    # class 0: 0.9 (0), 0.8 (4), 0.5 (2), 0.5 (3), 0.1 -> round(0.4 * 5) = 2 kept: 0, 4
    # class 1: 0.7 (6), 0.6 (8), 0.4 (9), 0.3, 0.2 -> 6, 8
    np.testing.assert_array_equal(sfilter.top_per_class(scores, labels, 0.4), [0, 4, 6, 8])
    # ties keep the lower seed: class 0 at 0.6 -> round(3) = 3 kept: 0, 4, 2
    np.testing.assert_array_equal(sfilter.top_per_class(scores, labels, 0.6), [0, 2, 4, 6, 8, 9])
    with pytest.raises(ValueError):
        sfilter.top_per_class(scores, labels, 0.0)


def test_resume_refuses_other_settings_and_bad_input(env, run_dir, tmp_path):
    model = load_model(run_dir)
    out = str(tmp_path / 'out')
    run.sample(model, out, first=0, end=4, batch_size=4, shard_size=4, solver_options={'num_steps': 3})
    with pytest.raises(ValueError, match='solver.num_steps'):
        run.sample(model, out, first=0, end=4, batch_size=4, shard_size=4, solver_options={'num_steps': 4})
    with pytest.raises(ValueError, match='multiple'):
        run.sample(model, str(tmp_path / 'x'), first=0, end=4, batch_size=0)
    for bad, match in [(['--seeds', '5-2'], 'empty'), (['--num_samples', '3', '--seeds', '0-9'], 'disagrees')]:
        with pytest.raises(ValueError, match=match):
            shards.parse_seeds(*(dict(zip(bad[::2], bad[1::2])).get(k) for k in ('--seeds',)),
                               int(dict(zip(bad[::2], bad[1::2])).get('--num_samples', 0)) or None)
    # CLI: one-line errors with non-zero exits
    cases = [
        (['--workdir', tmp_path / 'nowhere', '--out', tmp_path / 'o1', '--num_samples', 4], 1, 'not found'),
        (['--workdir', run_dir, '--out', tmp_path / 'o2', '--num_samples', 4, '--S_churn', 1, '--solver', 'ddim'],
         2, 'takes no option S_churn'),  # command-line errors: exit 2
        (['--workdir', run_dir, '--out', tmp_path / 'o3'], 2, '--num_samples'),  # a command-line error
        (['--out', tmp_path / 'o4', '--num_samples', 4], 2, '--workdir is required'),
    ]
    empty_run = tmp_path / 'empty_run'
    empty_run.mkdir()
    (empty_run / 'config.json').write_text(open(os.path.join(run_dir, 'config.json')).read())
    cases.append((['--workdir', empty_run, '--out', tmp_path / 'o5', '--num_samples', 4], 1, 'no checkpoints'))
    for args, code, match in cases:
        result = sample_cli(env, *args)
        errors = [l for l in result.stderr.splitlines() if l.startswith('sample.py: error:')]
        assert result.returncode == code and len(errors) == 1 and match in errors[0], (args, result.stderr[-2000:])
        assert 'Traceback' not in result.stderr


def test_converted_edm_checkpoint_samples(tmp_path):
    """A converted EDM pickle (EDMPrecond, made by the test without torch) loads and samples with its precond."""
    from jaxdiff.nets import SongUNet, convert
    from edm_pickle_writer import edm_pickle
    net = SongUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, model_channels=16,
                   channel_mult=(1,), num_blocks=1, attn_resolutions=())
    variables = net.init(jax.random.key(1), np.zeros((1, 8, 8, 3)), np.zeros((1,)), np.zeros((1, 4)))
    path = tmp_path / 'net.pkl'
    path.write_bytes(edm_pickle(convert.to_edm(variables), net))
    convert.convert_pickle(str(path), str(tmp_path / 'conv'))
    model = load_model(str(tmp_path / 'conv'))
    assert model.description['precond'] == 'EDMPrecond' and model.label_dim == 4 and model.channels == 3
    run.sample(model, str(tmp_path / 'out'), first=0, end=4, batch_size=4, shard_size=4,
               solver_options={'num_steps': 2}, transforms=['cfg:weight=1.5,negative=2'], log=lambda _: None)
    data = shards.load_samples(str(tmp_path / 'out'))
    assert data['images'].shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match='no training steps'):
        load_model(str(tmp_path / 'conv'), step=3)


def test_array_record_shards_read_back_through_grain_source(tmp_path):
    from jaxdiff.data.records import ArrayRecordSource
    out = tmp_path / 'out'
    run.sample(gmm_model(), str(out), first=3, end=13, batch_size=4, shard_size=6, solver_options={'num_steps': 5},
               labels=gen.make_labels(2, class_balanced=True), array_record=True, log=lambda _: None)
    data = shards.load_samples(str(out))
    source = ArrayRecordSource(str(out / shards.RECORDS_DIR))
    assert len(source) == 10 and source.num_classes == 2
    for i in range(10):
        item = source[i]
        np.testing.assert_array_equal(item['image'], data['images'][i])
        assert item['label'] == data['labels'][i] == (i + 3) % 2


def test_filter_folder_keeps_confident_samples(tmp_path):
    """Real digits with every third label wrong: the top 60% per class by the digits classifier's p(label) are
    (nearly all) the correctly labelled ones, and the output is a sample folder of the same format."""
    from jaxdiff.metrics.feature_classifier import dataset_split
    images, labels = dataset_split('digits_classifier', 'ref')
    images, labels = images[:300], labels[:300].copy()
    wrong = np.arange(300) % 3 == 0
    labels[wrong] = (labels[wrong] + 1) % 10
    folder = tmp_path / 'samples'
    shards.write_samples(str(folder), images, labels, 10, first=100, shard_size=128,
                         record={'labels': {'mode': 'cycle', 'values': [], 'num_classes': 10}})
    out = sfilter.filter_folder(str(folder), 0.6, 'digits_classifier', shard_size=100, log=lambda _: None)
    kept = shards.load_samples(out)
    counts = np.bincount(labels, minlength=10)
    assert len(kept['seeds']) == sum(int(round(0.6 * c)) for c in counts)
    kept_wrong = wrong[kept['seeds'] - 100]
    assert kept_wrong.mean() < 0.05, kept_wrong.mean()  # a third of the input was mislabelled
    assert np.all(np.diff(kept['seeds']) > 0)
    manifest = json.load(open(os.path.join(out, 'manifest.json')))
    assert manifest['complete'] and manifest['classifier'] == 'digits_classifier' and manifest['fraction'] == 0.6
    assert manifest['mean_score_kept'] > manifest['mean_score_all']
