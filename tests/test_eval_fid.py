"""python -m eval.fid: the JSON line, statistics files, seed ranges (EDM protocol), the scale of the offline
distance (real < model-like < noise), and one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eval import fid as fid_cli
from jaxdiff import cli as cli_module
from jaxdiff.evaluation import fid
from jaxdiff.metrics import frechet
from jaxdiff.sampling import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def cache():
    """The test process's classifier cache (tests/conftest.py: the digits classifier trains once per worker)."""
    return os.environ['JAXDIFF_CACHE']


def write_folder(folder, images, labels, first=0, shard_size=200):
    """A finished sample.py folder: its shards and the complete manifest."""
    shards.write_samples(str(folder), images, labels, 10, first=first, shard_size=shard_size)


def cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'eval.fid', *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_distances_have_a_scale_and_seed_ranges(cache, tmp_path):
    from jaxdiff.metrics.feature_classifier import dataset_split
    train, labels = dataset_split('digits_classifier', 'train')
    blurred = np.clip(train.astype(np.int16) + np.random.default_rng(0).integers(-40, 40, train.shape), 0, 255)
    write_folder(tmp_path / 's', blurred.astype(np.uint8)[:1000], labels[:1000])
    quiet = dict(log=lambda _: None)
    same = fid.evaluate('digits', 'digits', 'digits_classifier', **quiet)
    real = fid.evaluate('digits:heldout', 'digits', 'digits_classifier', **quiet)['fd']
    assert abs(same['fd']) < 1e-4 * real and same['precision'] == 1.0 and same['recall'] == 1.0
    model = fid.evaluate(str(tmp_path / 's'), 'digits', 'digits_classifier', **quiet)
    noise = fid.evaluate('noise', 'digits', 'digits_classifier', num_samples=1000, **quiet)['fd']
    assert 0 < real < model['fd'] < noise, (real, model['fd'], noise)
    assert model['features'] == 'digits_classifier' and model['num_samples'] == 1000 and 'fid' not in model
    assert 1.0 <= model['is'] <= 10.0 and 0 <= model['precision'] <= 1 and 0 <= model['recall'] <= 1
    # seed ranges: the FD of each range equals the FD of that slice; the min is reported
    ranged = fid.evaluate(str(tmp_path / 's'), 'digits', 'digits_classifier',
                          seed_ranges=[(0, 499), (500, 999)], **quiet)
    first_half = fid.evaluate(str(tmp_path / 's'), 'digits', 'digits_classifier', num_samples=500, **quiet)
    assert ranged['fd_per_range'][0] == pytest.approx(first_half['fd'], rel=1e-9)
    assert ranged['fd'] == min(ranged['fd_per_range'])
    with pytest.raises(ValueError, match='seeds 0-1999'):
        fid.evaluate(str(tmp_path / 's'), 'digits', 'digits_classifier', seed_ranges=[(0, 1999)], **quiet)


def test_cli_json_line_and_stats_file(cache, tmp_path, capsys):
    stats = tmp_path / 'ref_stats.npz'
    made = cli('--samples', 'digits', '--ref', 'digits', '--features', 'digits_classifier',
               '--save_stats', stats)
    assert made.returncode == 0, made.stderr[-2000:]
    mu, sigma = frechet.load_stats(str(stats))
    assert mu.shape == (sigma.shape[0],) and sigma.shape[0] == sigma.shape[1]

    def last_line(*args):  # the CLI in this process (a subprocess each costs ~6 s of imports)
        assert fid_cli.main([str(a) for a in args]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    a = last_line('--samples', 'digits:heldout', '--ref', 'digits', '--features', 'digits_classifier', '--json',
                  tmp_path / 'r.json', '--label', 'real')
    b = last_line('--samples', 'digits:heldout', '--ref', stats, '--features', 'digits_classifier')
    assert a['fd'] == pytest.approx(b['fd'], rel=1e-9) and a['label'] == 'real'
    assert 'precision' in a and 'precision' not in b  # statistics carry no points for precision/recall
    assert json.load(open(tmp_path / 'r.json')) == a


def damaged_inputs(tmp_path) -> dict:
    """A finished 2-shard sample folder of held-out digits and its damaged variants (interrupted: manifest
    complete=false; holed: a shard missing; torn: a shard cut in half), a random-bytes .npz and NaN statistics."""
    from jaxdiff.metrics.feature_classifier import dataset_split
    images, labels = dataset_split('digits_classifier', 'heldout')
    write_folder(tmp_path / 'done', images[:400], labels[:400])
    out = {}
    for name in ('interrupted', 'holed', 'torn'):
        out[name] = tmp_path / name
        shutil.copytree(tmp_path / 'done', out[name])
    manifest = json.loads((out['interrupted'] / 'manifest.json').read_text())
    (out['interrupted'] / 'manifest.json').write_text(json.dumps(dict(manifest, complete=False, shards=[])))
    (out['holed'] / 'shard-00001.npz').unlink()
    torn = out['torn'] / 'shard-00000.npz'
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
    out['junk'] = tmp_path / 'junk.npz'
    out['junk'].write_bytes(np.random.default_rng(0).bytes(5000))
    out['nan_stats'] = tmp_path / 'nan_stats.npz'
    np.savez(out['nan_stats'], mu=np.full(8, np.nan), sigma=np.eye(8))
    return out


def test_one_line_errors(cache, tmp_path, monkeypatch, capsys):
    """Bad inputs end in one line naming the file; a score never comes from an unfinished sample folder unless
    asked for (--allow_incomplete: the JSON says how many images it used)."""
    (tmp_path / 'empty').mkdir()
    small = tmp_path / 'small.npz'
    np.savez(small, images=np.zeros((10, 16, 16, 1), np.uint8))
    bad = damaged_inputs(tmp_path)
    digits = ['--features', 'digits_classifier']
    cases = [
        (['--samples', tmp_path / 'empty', '--ref', 'digits', '--features', 'digits_classifier'], 'no images'),
        (['--samples', small, '--ref', 'digits', '--features', 'digits_classifier'], 'image sizes differ'),
        (['--samples', tmp_path / 'nowhere', '--ref', 'digits', '--features', 'digits_classifier'],
         'not an image set'),
        (['--samples', 'digits', '--ref', 'digits'], '--inception_weights'),
        (['--samples', 'digits', '--ref', 'digits', '--features', 'inception', '--inception_weights',
          tmp_path / 'missing.pth'], 'missing.pth'),
        (['--samples', bad['interrupted'], '--ref', 'digits', *digits], 'interrupted is incomplete'),
        (['--samples', bad['holed'], '--ref', 'digits', *digits], 'holed lacks 1 of the 2 shards'),
        (['--samples', bad['torn'], '--ref', 'digits', *digits], 'shard-00000.npz is not readable as a sample shard'),
        (['--samples', 'digits', '--ref', bad['junk'], *digits], 'junk.npz is not readable'),
        (['--samples', 'digits', '--ref', bad['nan_stats'], *digits], 'nan_stats.npz holds NaN or inf'),
    ]
    # The first case as users run it (a subprocess: one line, exit 1, no traceback); the rest in this process, with
    # fail's exit turned into SystemExit (a subprocess each would cost ~5 s of imports).
    result = cli(*cases[0][0])
    errors = [l for l in result.stderr.splitlines() if l.startswith('eval.fid: error:')]
    assert result.returncode == 1 and len(errors) == 1 and cases[0][1] in errors[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr

    def fail(prog, message, code):
        raise SystemExit((code, f'{prog}: error: {message}'))

    monkeypatch.setattr(fid_cli, 'fail', fail)
    monkeypatch.setattr(cli_module, 'fail', fail)  # argument errors
    for args, match in cases[1:]:
        with pytest.raises(SystemExit) as exit:
            fid_cli.main([str(a) for a in args])
        code, line = exit.value.code
        assert code == 1 and line.startswith('eval.fid: error:') and match in line, (args, line)
    with pytest.raises(SystemExit) as exit:
        fid_cli.main(['--samples', 'digits'])
    assert exit.value.code == (2, 'eval.fid: error: the following arguments are required: --ref')
    for args, message in ((['--protocol', 'edm', '--seed_ranges', '0-9'], 'give --protocol or --seed_ranges, not both'),
                          (['--seed_ranges', '9-0'], "--seed_ranges '9-0': expected A-B")):
        with pytest.raises(SystemExit) as exit:  # command-line errors: exit 2
            fid_cli.main(['--samples', 'digits', '--ref', 'digits', *args])
        assert exit.value.code[0] == 2 and message in exit.value.code[1], exit.value.code
    capsys.readouterr()
    assert fid_cli.main(['--samples', str(bad['holed']), '--ref', 'digits', *digits, '--allow_incomplete']) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])['num_samples'] == 200 and 'scoring the 200 images present' in err


def test_inception_features_give_fid(tmp_path):
    """--features inception with a weights file in pytorch-fid's layout: 'fid' equals the Fréchet distance of the
    network's pool3 features computed directly; IS uses the bias-free logits."""
    import jax
    import jax.numpy as jnp
    from test_inception import random_variables, write_torch_legacy
    from jaxdiff.metrics.inception import FIDInceptionV3, inception_features, to_torch_state_dict
    from jaxdiff.metrics.inception_score import inception_score
    variables = random_variables(jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
    weights = tmp_path / 'pt_inception.pth'
    write_torch_legacy(weights, to_torch_state_dict(variables))
    rng = np.random.default_rng(0)
    fake, real = rng.integers(0, 256, (2, 12, 8, 8, 1), dtype=np.uint8)
    fake[:, 2:6] = 255  # a visible difference between the sets
    np.savez(tmp_path / 'fake.npz', images=fake)
    np.savez(tmp_path / 'real.npz', images=real)
    result = fid.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'real.npz'), 'inception',
                          inception_weights=str(weights), log=lambda _: None)
    f, r = (inception_features(variables, x) for x in (fake, real))
    stats = [(np.mean(np.asarray(x['pool'], np.float64), 0), np.cov(np.asarray(x['pool'], np.float64),
                                                                      rowvar=False)) for x in (f, r)]
    assert result['fid'] == pytest.approx(frechet.frechet_distance(*stats[0], *stats[1]), rel=1e-6)
    assert 'fd' not in result and result['features'] == 'inception' and result['num_ref'] == 12
    unbiased = np.asarray(f['pool']) @ np.asarray(variables['params']['fc']['weight'])
    assert result['is'] == pytest.approx(inception_score(unbiased, splits=10)[0], rel=1e-5)
