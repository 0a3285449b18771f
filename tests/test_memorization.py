"""Privacy audits: the exact nearest-neighbour search (against brute-force numpy, on 1 and 8 devices), Carlini et
al.'s normalised distance, planted training copies found exactly, membership by denoising loss on a memorising
denoiser, the ROC numbers against hand computation, and data.max_size's subset."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import toy
from jaxdiff.evaluation import memorization as mem
from jaxdiff.metrics.denoising_loss import denoising_losses
from jaxdiff.metrics.nearest import NearestSearch, to_rows
from jaxdiff.metrics.roc import roc_curve, roc_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(queries, reference, k):
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - reference[None].astype(np.float64)) ** 2).mean(-1))
    order = np.argsort(d, axis=1, kind='stable')[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def test_search_equals_brute_force_across_blocks_and_batches():
    rng = np.random.default_rng(0)
    reference = rng.random((301, 20), np.float32)  # 301 = 4 blocks of 80 with padding
    queries = rng.random((37, 20), np.float32)     # 37 = 2 batches of 32 with padding
    queries[5] = reference[123]                    # an exact copy: distance 0, despite the matmul's cancellation
    found = NearestSearch(reference, 7, batch_size=32, block_size=80)(queries)
    want_d, want_i = brute_force(queries, reference, 7)
    np.testing.assert_array_equal(found.indices, want_i)
    np.testing.assert_allclose(found.distances, want_d, rtol=1e-5, atol=1e-7)
    assert found.distances[5, 0] == 0 and found.indices[5, 0] == 123


EIGHT_DEVICES = r'''
import sys, numpy as np, jax
sys.path.insert(0, sys.argv[1])
from test_memorization import brute_force
from jaxdiff.metrics.nearest import NearestSearch
assert jax.device_count() == 8
rng = np.random.default_rng(1)
reference, queries = rng.random((500, 48), np.float32), rng.random((123, 48), np.float32)
found = NearestSearch(reference, 5, batch_size=4, block_size=128)(queries)
d, i = brute_force(queries, reference, 5)
np.testing.assert_array_equal(found.indices, i)
np.testing.assert_allclose(found.distances, d, rtol=1e-5)
print('ok', found.distances.shape)
'''


def test_search_sharded_over_eight_devices_equals_brute_force(env):
    from conftest import xla_flags
    out = subprocess.run([sys.executable, '-c', EIGHT_DEVICES, os.path.join(ROOT, 'tests')], cwd=ROOT,
                         env=dict(env, XLA_FLAGS=xla_flags(8)), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'ok (123, 5)' in out.stdout


def test_normalised_distance_by_hand():
    d = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [2.0, 2.0, 2.0]])
    # l = d1 / (alpha * mean(d)): 1 / (0.5 * 2) = 1; an exact copy is 0; three equidistant neighbours give 2
    np.testing.assert_allclose(mem.normalised_distance(d, 0.5), [1.0, 0.0, 2.0])
    np.testing.assert_allclose(mem.normalised_distance(d, 0.5, denominators=np.array([4.0, 1.0, 1.0])),
                               [0.5, 0.0, 4.0])


def _training(rng, n=200, side=8):
    images = rng.integers(0, 256, (n, side, side, 1), dtype=np.uint8)
    return mem.TrainingData(images, rng.integers(0, 10, n).astype(np.int32), None, None, True, 'random')


def test_planted_copies_are_exactly_the_extracted_samples(tmp_path):
    rng = np.random.default_rng(2)
    train = _training(rng)
    samples = rng.integers(0, 256, (120, 8, 8, 1), dtype=np.uint8)
    planted = {7: (11, False), 50: (60, False), 99: (150, True)}  # sample row -> (training index, mirrored)
    for row, (index, flipped) in planted.items():
        samples[row] = train.images[index][:, ::-1] if flipped else train.images[index]
    batches = [dict(images=samples[:64], labels=None, seeds=np.arange(64) + 1000),
               dict(images=samples[64:], labels=None, seeds=np.arange(64, 120) + 1000)]
    audit = mem.extraction_audit(iter(batches), train, n=50, keep=8, log=lambda m: None)
    per = audit['per_sample']
    extracted = np.flatnonzero(per['l'] < 1)
    np.testing.assert_array_equal(extracted, sorted(planted))
    for row, (index, flipped) in planted.items():
        assert per['nn_index'][row] == index and per['nn_flipped'][row] == flipped and per['l'][row] == 0
    # random images sit at a typical distance from every training image: l near 1 / alpha, nowhere near 1
    assert per["l"][np.setdiff1d(np.arange(120), extracted)].min() > 1.3
    summary = mem.write_extraction(audit, train, str(tmp_path))
    assert summary['extracted'] == 3 and summary['extraction_rate'] == pytest.approx(3 / 120)
    saved = json.load(open(tmp_path / 'extraction.json'))
    assert sorted((e['seed'], e['train_index'], e['flipped']) for e in saved['extracted_samples']) == \
        [(1000 + r, i, f) for r, (i, f) in sorted(planted.items())]
    assert (tmp_path / 'extracted.png').is_file() and (tmp_path / 'l_histogram.png').is_file()
    np.testing.assert_array_equal(np.load(tmp_path / 'per_sample.npz')['seeds'], np.arange(120) + 1000)


def test_training_neighbourhood_variant_by_hand():
    rng = np.random.default_rng(3)
    train = _training(rng, n=30)._replace(xflip=False)
    samples = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    audit = mem.extraction_audit([dict(images=samples)], train, n=4, neighbours='train', log=lambda m: None)
    per = audit['per_sample']
    rows = to_rows(train.images).astype(np.float64)
    for q in range(6):
        nn = per['nn_index'][q]
        d = np.sqrt(((rows - rows[nn]) ** 2).mean(1))
        d[nn] = np.inf  # the image itself is left out
        want = np.sqrt(((to_rows(samples[q:q + 1])[0] - rows[nn]) ** 2).mean()) / (0.5 * np.sort(d)[:4].mean())
        assert per['l'][q] == pytest.approx(want, rel=1e-5)


def test_roc_numbers_by_hand():
    pos, neg = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.7, 0.65, 0.5, 0.4, 0.3])
    # Mann-Whitney: pairs (p, n) with p > n, ties half: 0.9, 0.8 beat all 5; 0.7 beats 4, ties 1; 0.6 beats 3
    want_auc = (5 + 5 + 4.5 + 3) / 20
    s = roc_summary(pos, neg, max_fprs=(0.01, 0.2))
    assert s['auc'] == pytest.approx(want_auc)
    # FPR <= 0.2 allows one negative above the threshold: threshold 0.7 takes 0.9, 0.8, 0.7 (TPR 3/4) and 0.7
    assert s['tpr_at_fpr'] == {'0.01': 0.5, '0.2': 0.75}
    # best accuracy 7 of 9: threshold 0.8 (2 TP + 5 TN) or 0.6 (4 TP + 3 TN); the higher threshold is reported
    assert s['accuracy'] == pytest.approx(7 / 9) and s['threshold'] == 0.8
    fpr, tpr, thr = roc_curve(pos, neg)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.4, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.75, 0.75, 1, 1, 1, 1])
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 20, 300).astype(float), rng.integers(0, 20, 200).astype(float) - 3  # many ties
    pairwise = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (300 * 200)
    assert roc_summary(a, b)['auc'] == pytest.approx(pairwise, abs=1e-12)


def test_denoising_loss_of_the_exact_gaussian_denoiser():
    # data N(0, 1) per pixel: D(x, s) = x / (1 + s^2), E loss = (s^2 + s^4 x^2) / (1 + s^2)^2 per pixel
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    x = images.astype(np.float64) / 127.5 - 1
    sigmas = (0.3, 1.5)
    losses = denoising_losses(lambda v, s, c: v / (1 + s[:, None, None, None] ** 2), images, None, 0, sigmas,
                              draws=64, batch_size=16)
    for j, s in enumerate(sigmas):
        want = ((s ** 2 + s ** 4 * x ** 2) / (1 + s ** 2) ** 2).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(losses[:, j], want, rtol=0.06)
    again = denoising_losses(lambda v, s, c: v / (1 + s[:, None, None, None] ** 2), images, None, 0, sigmas,
                             draws=64, batch_size=40)
    np.testing.assert_allclose(again, losses, rtol=1e-5)  # the noise follows the image index, not the batch


def test_membership_separates_members_of_a_memorising_denoiser():
    rng = np.random.default_rng(6)
    pool = rng.integers(0, 256, (80, 4, 4, 1), dtype=np.uint8)
    members, others = pool[:40], pool[40:]
    # the exact denoiser of the members' empirical distribution: it has memorised every training image
    memorised = toy.mixture(jnp.asarray(members, jnp.float32) / 127.5 - 1, 1e-3)
    # a denoiser that never saw any: the exact one of a Gaussian with the pool's mean and spread
    unseen = toy.mixture(jnp.zeros((1, 4, 4, 1)), float(np.std(pool / 127.5 - 1)))
    train = mem.TrainingData(members, np.zeros(40, np.int32), others, np.zeros(40, np.int32), False, 'pool')
    strong = mem.membership_audit(toy.denoiser(memorised), 0, train, sigmas=(0.3,), num=40, log=lambda m: None)
    blind = mem.membership_audit(toy.denoiser(unseen), 0, train, sigmas=(0.3,), num=40, log=lambda m: None)
    assert strong['per_sigma']['0.3']['auc'] > 0.95 and strong['eps_mean']['tpr_at_fpr']['0.01'] > 0.5
    assert 0.3 < blind['per_sigma']['0.3']['auc'] < 0.7


def test_max_size_keeps_edms_seeded_subset_and_the_rest_is_held_out():
    import ml_collections
    from jaxdiff.config import base_config
    from jaxdiff.data.sources import make_source, subset_indices
    keep = subset_indices(1797, 100)
    assert len(keep) == 100 and np.all(np.diff(keep) > 0) and keep.max() < 1797
    np.testing.assert_array_equal(keep, subset_indices(1797, 100))
    assert subset_indices(1797, 0) is None and subset_indices(1797, 5000) is None
    data = ml_collections.ConfigDict(base_config().data.to_dict())
    data.max_size = 100
    source, info = make_source(data)
    assert info.size == len(source) == 100
    train = mem.run_training_data(data)
    assert len(train.images) == 100 and len(train.heldout_images) == 1697
    everything = np.concatenate([train.images, train.heldout_images]).reshape(1797, -1)
    from jaxdiff.data.sources import load_digits
    assert sorted(map(bytes, everything)) == sorted(map(bytes, load_digits()[0].reshape(1797, -1)))
    np.testing.assert_array_equal(train.images, load_digits()[0][keep])
    heldout = next(mem.sample_batches('run:heldout', train=train))
    np.testing.assert_array_equal(heldout['images'], train.heldout_images)
    with pytest.raises(ValueError, match='trained on all'):
        mem.run_images('run:heldout', train._replace(heldout_images=None))


def test_filter_drops_exactly_the_planted_copies(tmp_path):
    from jaxdiff.sampling import filter as sfilter
    from jaxdiff.sampling import shards
    rng = np.random.default_rng(7)
    train = _training(rng, n=150)
    images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    images[[3, 17, 31]] = train.images[[5, 6, 7]]
    images[17] = images[17][:, ::-1]  # a mirrored copy: x-flip training saw it too
    shards.write_samples(str(tmp_path / 's'), images, np.arange(40) % 10, 10, first=0, shard_size=16,
                         record={'labels': {'mode': 'cycle', 'values': [], 'num_classes': 10}})
    out = sfilter.filter_folder(str(tmp_path / 's'), memorized=mem.memorization_check(train, 1.0), shard_size=16,
                                log=lambda m: None)
    kept = shards.load_samples(out)
    np.testing.assert_array_equal(kept['seeds'], np.setdiff1d(np.arange(40), [3, 17, 31]))
    manifest = json.load(open(os.path.join(out, 'manifest.json')))
    assert out.endswith('unmemorized') and manifest['memorized_dropped'] == 3 and manifest['num_input'] == 40
    with pytest.raises(ValueError, match='nothing to filter'):
        sfilter.filter_folder(str(tmp_path / 's'))


def test_cli_errors_are_one_line_and_the_oracle_prints_its_table(env, tmp_path):
    from conftest import run_together
    cases = [(['eval.memorization', '--out', str(tmp_path)], 2, 'choose one: --samples DIR'),
             (['eval.memorization', '--samples', str(tmp_path / 'none'), '--train', 'digits:all', '--out',
               str(tmp_path)], 1, 'is not an image set'),
             (['eval.memorization', '--membership', '--workdir', str(tmp_path / 'none'), '--out', str(tmp_path)],
              1, 'run directory not found'),
             (['eval.provenance', '--workdir', str(tmp_path)], 2, 'detection needs --workdir RUN --real SPEC'),
             (['eval.provenance', '--oracle', '--steps', '4,8', '--order', '2'], 0, '')]
    results = run_together([[sys.executable, '-m', *argv] for argv, _, _ in cases], env, ROOT)
    for (argv, code, needle), (returncode, stdout, stderr) in zip(cases, results):
        assert returncode == code, (argv, stderr[-2000:])
        if code:
            lines = stderr.strip().splitlines()
            assert stdout == '' and lines[-1].startswith(f'{argv[0]}: error:') and needle in lines[-1], stderr
            assert 'Traceback' not in stderr
    oracle = json.loads(results[-1][1].strip().splitlines()[-1])
    assert [r['steps'] for r in oracle['rows']] == [4, 8] and oracle['rows'][1]['rms'] < oracle['rows'][0]['rms']
