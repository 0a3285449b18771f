"""Adversarial training (jaxdiff.tasks.adversarial / robust.adv_step / mixed_data): schedule, mixed batches, TRADES and PGD-AT
steps, the train.py run with checkpoints, resume and metrics, and its one-line errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff.engine.ema import decay_per_step
from jaxdiff.robust import adv_step, mixed_data
from jaxdiff.tasks import adversarial
from jaxdiff.robust.pgd import pgd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_one_cycle(t, total, max_lr, pct, div=25.0, final_div=1e4, m_lo=0.85, m_hi=0.95):
    """torch.optim.lr_scheduler.OneCycleLR (cos, two phases) written out: (lr, momentum) at step t."""
    initial, low = max_lr / div, max_lr / div / final_div
    phases = [(pct * total - 1, initial, max_lr, m_hi, m_lo), (total - 1, max_lr, low, m_lo, m_hi)]
    start = 0.0
    for i, (end, a, b, ma, mb) in enumerate(phases):
        if t <= end or i == len(phases) - 1:
            p = (t - start) / (end - start)
            cos = lambda s, e: e + (s - e) / 2 * (math.cos(math.pi * p) + 1)  # noqa: E731
            return cos(a, b), cos(ma, mb)
        start = end


def test_one_cycle_matches_torch_formula():
    for total, pct in ((400, 0.025), (37, 0.1), (1000, 0.3)):
        for t in sorted({0, 1, int(pct * total) - 1, int(pct * total), total // 2, total - 2, total - 1}):
            lr, mom = adv_step.one_cycle(t, total, 0.2, pct)
            want_lr, want_m = torch_one_cycle(t, total, 0.2, pct)
            np.testing.assert_allclose(float(lr), want_lr, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(float(mom), want_m, rtol=1e-6)
    assert abs(float(adv_step.one_cycle(0, 400, 0.2, 0.025)[0]) - 0.2 / 25) < 1e-8
    assert abs(float(adv_step.one_cycle(9, 400, 0.2, 0.025)[0]) - 0.2) < 1e-7  # peak at epoch 10
    c = adversarial.adversarial_config()
    c.epochs, c.optim.per_epoch = 10, True  # the reference steps the schedule once per epoch
    lrs = [float(adv_step.schedule(c, 7, 70, s)[0]) for s in range(14)]
    assert len(set(lrs[:7])) == 1 and len(set(lrs[7:])) == 1 and lrs[0] != lrs[7]
    c.optim.cycle_momentum = False
    assert float(adv_step.schedule(c, 7, 70, 30)[1]) == pytest.approx(0.9)


def _data(n_real=50, n_gen=30, held=0):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_real, 4, 4, 1), dtype=np.uint8)
    labels = np.arange(n_real, dtype=np.int32)  # label = index: batches can be traced back
    gen = rng.integers(0, 256, (n_gen, 4, 4, 1), dtype=np.uint8) if n_gen else None
    gen_labels = 1000 + np.arange(n_gen, dtype=np.int32) if n_gen else None
    return mixed_data.AdvData(images, labels, gen, gen_labels, images[:held], labels[:held], None)


def test_mixed_batches_counts_determinism_and_resume():
    data = _data()
    b = mixed_data.MixedBatches(data, 16, 0.7, seed=3)
    assert (b.n_real, b.n_gen) == (5, 11) and mixed_data.split_counts(512, 0.7) == (154, 358)
    assert b.steps_per_epoch == math.ceil(50 / 16)  # the real set alone: generated data do not lengthen an epoch
    for step in range(25):
        batch = b.batch(step)
        assert batch['image'].shape == (16, 4, 4, 1)
        assert (batch['label'] < 1000).sum() == 5 and (batch['label'] >= 1000).sum() == 11
        np.testing.assert_array_equal(batch['generated'], batch['label'] >= 1000)
    # every real example once per pass of the real stream (50 = 10 steps of 5), generated likewise
    seen = np.concatenate([b.indices(s)[0] for s in range(10)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(50))
    # a fresh object (a resumed run) gives the same batches at any step, in any order of requests
    again = mixed_data.MixedBatches(data, 16, 0.7, seed=3)
    for step in (24, 3, 11):
        np.testing.assert_array_equal(again.batch(step)['label'], b.batch(step)['label'])
    other = mixed_data.MixedBatches(data, 16, 0.7, seed=4)
    assert not np.array_equal(other.batch(0)['label'], b.batch(0)['label'])
    # passes differ (reshuffled per epoch) and a process's rows are a slice of the global batch
    assert not np.array_equal(b.indices(0)[0], b.indices(10)[0])
    for rows in (slice(8, 16), slice(3, 9)):  # all generated; across the real / generated boundary
        for key, value in b.batch(2, rows).items():
            np.testing.assert_array_equal(value, b.batch(2)[key][rows])
    real_only = mixed_data.MixedBatches(_data(n_gen=0), 16, 0.7, seed=3)
    assert (real_only.n_real, real_only.n_gen, real_only.steps_per_epoch) == (16, 0, 4)


def test_epoch_is_the_references_on_cifar10_config():
    """configs/robust/cifar10.py with 1M generated images: DM-Improves-AT's step counts, worked out here from its
    formulas alone. core/data/cifar10s.py sets dataset_size = len(CIFAR-10 train) = 50,000 before the generated data
    are appended and the 1,024 validation images cut (core/data/semisup.py); its sampler runs
    num_batches = ceil(dataset_size / batch_size) per epoch. cosinew = OneCycleLR(total_steps=epochs, pct_start
    0.025) stepped once per epoch, phase 1 ending at index pct_start * total - 1; the EMA (watrain.py) has
    warmup_steps = 0.025 * epochs * (floor(50000 / B) + 1) and averages once the 1-based update count reaches it."""
    from jaxdiff.config import from_file
    c = from_file(os.path.join(ROOT, 'configs', 'robust', 'cifar10.py'))
    B, epochs, n_cifar, held = 512, 400, 50_000, 1024
    assert (c.batch_size, c.epochs, c.optim.pct_start, c.eval.size, c.optim.per_epoch) == (B, epochs, 0.025, held,
                                                                                             True)
    # the reference, by hand
    ref_spe = int(np.ceil(n_cifar / B))                              # 98
    ref_total = epochs * ref_spe                                     # 39,200
    ref_peak_epoch = int(0.025 * epochs - 1)                         # scheduler index 9 = the 10th epoch
    ref_peak_steps = range(ref_peak_epoch * ref_spe, (ref_peak_epoch + 1) * ref_spe)  # 0-based updates 882..979
    ref_ema_first = 0.025 * epochs * (int(np.floor(n_cifar / B)) + 1)  # 1-based update 980 averages first
    assert (ref_spe, ref_total, list(ref_peak_steps)[-1], ref_ema_first) == (98, 39_200, 979, 980)
    # jaxdiff: batches over 48,976 real + 1,024 held out + 1M generated (zero-stride arrays, no memory)
    real = np.broadcast_to(np.zeros((1, 32, 32, 3), np.uint8), (n_cifar - held, 32, 32, 3))
    gen = np.broadcast_to(np.zeros((1, 32, 32, 3), np.uint8), (1_000_000, 32, 32, 3))
    data = mixed_data.AdvData(real, np.zeros(n_cifar - held, np.int32), gen, np.zeros(1_000_000, np.int32),
                              real[:held], np.zeros(held, np.int32), None)
    batches = mixed_data.MixedBatches(data, B, c.generated_fraction, c.seed)
    assert (batches.n_real, batches.n_gen) == (154, 358)
    assert mixed_data.real_train_size(data) == n_cifar
    lengths = adversarial.run_lengths(c, mixed_data.real_train_size(data))
    assert batches.steps_per_epoch == lengths['steps_per_epoch'] == ref_spe == 98
    assert lengths['total_steps'] == ref_total == 39_200
    assert lengths['ema_warmup_steps'] == ref_ema_first
    # the same library functions on jaxdiff's side: lr at its peak exactly in the reference's 10th epoch, and the
    # EMA's first averaging update is that epoch's last
    steps = np.arange(2 * 980)
    lr = np.asarray(adv_step.schedule(c, lengths['steps_per_epoch'], lengths['total_steps'], steps)[0])
    assert list(np.flatnonzero(np.isclose(lr, c.optim.lr, rtol=1e-6, atol=0))) == list(ref_peak_steps)
    assert lr[881] < lr[882] and lr[980] < lr[979]
    tau = decay_per_step(c.ema.halflife_img, c.batch_size)           # the half-life is the reference's --tau 0.995
    assert np.float32(tau) == np.float32(0.995)
    decay = np.asarray(adv_step.ema_decay(steps + 1, tau, lengths['ema_warmup_steps']))
    first_avg = int(np.flatnonzero(decay > 0)[0])                    # 0-based step of the first averaging update
    assert first_avg + 1 == ref_ema_first and first_avg == ref_peak_steps[-1]
    np.testing.assert_allclose(decay[first_avg], 0.1)               # (1 + 0) / (10 + 0)


class Linear(nn.Module):
    """A linear classifier with the WRN calling convention (train, mutable batch_stats, bn_momentum)."""
    num_classes: int = 3
    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _config(**overrides):
    c = adversarial.adversarial_config()
    c.eps, c.attack_step, c.attack_steps = 0.1, 0.03, 3
    c.data.crop_padding, c.data.xflip = 0, False
    c.optim.per_epoch, c.optim.cycle_momentum = False, False
    for key, value in overrides.items():
        c[key] = value
    return c


def _toy(n=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    centers = np.array([0.2, 0.5, 0.8])
    x = np.clip(centers[y][:, None, None, None] + 0.1 * rng.normal(size=(n, 2, 2, 1)), 0, 1)
    return np.round(x * 255).astype(np.uint8), y


def test_trades_loss_by_hand():
    net = Linear()
    images, y = _toy()
    state = adv_step.init_state(net, images.shape[1:], jax.random.key(1))
    c = _config(beta=5.0, label_smoothing=0.1)
    key = jax.random.key(7)
    new, metrics = jax.jit(lambda s, b, k: adv_step.train_step(c, net, 10, 100, 0.0, s, b, k))(
        state, dict(image=images, label=y), key)
    # reproduce the attack, then the loss in numpy: CE against (1 - ls) onehot + ls / K, plus beta KL(p || q)
    x = images.astype(np.float32) / 255
    f = lambda z: net.apply({'params': state.params}, z)  # noqa: E731
    k_attack = jax.random.split(jax.random.fold_in(key, 0))[1]
    x_adv = pgd(f, jnp.asarray(x), jnp.asarray(y), 0.1, key=k_attack, n_steps=3, step_size=0.03, loss='kl')
    assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6
    zn, za = np.asarray(f(x), np.float64), np.asarray(f(x_adv), np.float64)
    logp = zn - np.log(np.exp(zn).sum(1, keepdims=True))
    logq = za - np.log(np.exp(za).sum(1, keepdims=True))
    target = 0.9 * np.eye(3)[y] + 0.1 / 3
    ce = -(target * logp).sum(1).mean()
    kl = (np.exp(logp) * (logp - logq)).sum(1).mean()
    np.testing.assert_allclose(float(metrics['ce']), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics['kl']), kl, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(metrics['loss']), ce + 5.0 * kl, rtol=1e-5)
    loss, ce2, kl2 = adv_step.trades_objective(jnp.asarray(zn), jnp.asarray(za), jnp.asarray(y), 5.0, 0.1)
    np.testing.assert_allclose([float(loss), float(ce2), float(kl2)], [ce + 5 * kl, ce, kl], rtol=1e-5, atol=1e-7)
    # torch SGD (nesterov, coupled wd) from a zero buffer: d = g + wd p; b = d; p -= lr (d + mu b)
    lr = float(metrics['lr'])
    grads = jax.grad(lambda p: adv_step.trades_objective(net.apply({'params': p}, x), net.apply({'params': p}, x_adv),
                                                         jnp.asarray(y), 5.0, 0.1)[0])(state.params)
    for p, g, p1 in zip(jax.tree.leaves(state.params), jax.tree.leaves(grads), jax.tree.leaves(new.params)):
        d = g + 5e-4 * p
        np.testing.assert_allclose(p1, p - lr * (d + 0.9 * d), rtol=1e-4, atol=1e-7)
    # EMA before warm-up copies the params; the reference's dynamic decay after it
    np.testing.assert_allclose(float(adv_step.ema_decay(1, 0.995, 0.0)), 2 / 11)
    assert float(adv_step.ema_decay(5, 0.995, 10.0)) == 0.0
    assert float(adv_step.ema_decay(10_000, 0.995, 10.0)) == pytest.approx(0.995)


def test_pgd_at_reduces_adversarial_loss():
    net = Linear()
    images, y = _toy(48, seed=1)
    c = _config(method='pgd_at', label_smoothing=0.0, eps=0.05, attack_step=0.02)
    c.optim.lr, c.optim.weight_decay = 0.5, 0.0
    state = adv_step.init_state(net, images.shape[1:], jax.random.key(0))
    step = jax.jit(lambda s, b, k: adv_step.train_step(c, net, 100, 1000, 0.0, s, b, k))
    batch = dict(image=jnp.asarray(images), label=jnp.asarray(y))

    def adv_loss(params):
        f = lambda z: net.apply({'params': params}, z)  # noqa: E731
        x = jnp.asarray(images, jnp.float32) / 255
        x_adv = pgd(f, x, jnp.asarray(y), 0.05, key=jax.random.key(5), n_steps=10, step_size=0.02)
        return float(jnp.mean(-jax.nn.log_softmax(f(x_adv))[jnp.arange(len(y)), y]))

    before = adv_loss(state.params)
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch, jax.random.key(3))
        losses.append(float(metrics['loss']))
    assert adv_loss(state.params) < 0.8 * before
    assert losses[-1] < losses[0]


def _write_fake_samples(folder, n=96):
    """A sample.py-style folder: real digits relabelled as generated samples."""
    from jaxdiff.data.sources import load_digits
    from jaxdiff.sampling.shards import write_samples
    images, labels = load_digits()
    rows = np.arange(len(labels) - n, len(labels))
    write_samples(str(folder), images[rows], labels[rows], 10, first=int(rows[0]))
    return str(folder)


def _tiny_digits(tmp_path, **overrides):
    from jaxdiff.config import from_file
    c = from_file(os.path.join(ROOT, 'configs', 'robust', 'digits.py'))
    c.data.generated = _write_fake_samples(tmp_path / 'samples')
    c.generated_fraction = 0.5
    c.batch_size, c.total_steps, c.checkpoint_every, c.log_every = 16, 4, 2, 1
    c.model.depth, c.model.width = 10, 1
    c.attack_steps, c.eval.size, c.eval.every, c.eval.batch_size, c.eval.attack_steps = 2, 32, 2, 32, 3
    for key, value in overrides.items():
        c[key] = value
    return c


def test_run_checkpoints_and_logs(tmp_path):
    from jaxdiff.engine import checkpoint as ckpt
    from jaxdiff.tasks import registry
    from jaxdiff.engine.log import read_metrics
    c = _tiny_digits(tmp_path)
    out = registry.run(c, str(tmp_path / 'a'))  # dispatched on task='adversarial'
    assert out['step'] == 4 and out['resumed_from'] is None
    assert ckpt.Checkpointer(str(tmp_path / 'a'), 2).steps() == [2, 4]
    rows = read_metrics(str(tmp_path / 'a' / 'metrics.jsonl'))
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert all(0 <= r['clean_acc'] <= 1 and 0 <= r['adv_acc'] <= 1 and r['loss'] > 0 for r in rows)
    assert 'eval_pgd_acc' in rows[1] and 'eval_pgd_acc' in rows[3]
    best = adversarial.read_best(str(tmp_path / 'a'))
    assert best['step'] in (2, 4) and best['pgd_acc'] == max(rows[1]['eval_pgd_acc'], rows[3]['eval_pgd_acc'])
    assert ckpt.load_arrays(str(tmp_path / 'a' / 'best'))['step'] == best['step']
    # eval.robustness --selection recomputes the keep-best numbers from best/ (same evaluator, key and slice).
    from eval import robustness as cli
    sel = cli.run(cli.parse_args(['--workdir', str(tmp_path / 'a'), '--attacks', 'none', '--selection']),
                  log=lambda _: None)['selection']
    assert (sel['clean_acc'], sel['pgd_acc'], sel['eval_size']) == (best['clean_acc'], best['pgd_acc'], 32)
    assert sel['recorded'] == best
    # Resume after a crash (bitwise) is tested for every task in tests/test_tasks.py.


def test_one_line_errors(tmp_path):
    from jaxdiff.tasks import registry
    c = _tiny_digits(tmp_path)
    c.data.generated = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='data.generated=.*nowhere.*sample.py'):
        registry.run(c, str(tmp_path / 'w'))
    c.unlock()
    c.data.generated = ''
    with pytest.raises(ValueError, match='data.generated is empty'):
        registry.run(c, str(tmp_path / 'w'))
    c.task = 'bogus'
    with pytest.raises(ValueError, match=r"config.task='bogus' is not a task: use one of .*adversarial"):
        registry.run(c, str(tmp_path / 'w'))


@pytest.mark.slow
def test_train_cli_errors_and_run(tmp_path, env):
    base = [sys.executable, 'train.py', '--config', 'configs/robust/digits.py']
    missing = subprocess.run(base + ['--workdir', str(tmp_path / 'w'), f'--config.data.generated={tmp_path}/none',
                                     '--config.generated_fraction=0.7'], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().count('\n') == 0 and 'data.generated=' in missing.stderr
    flags = ['--config.total_steps=2', '--config.batch_size=16', '--config.model.width=1', '--config.attack_steps=2',
             '--config.eval.size=16', '--config.eval.batch_size=16', '--config.eval.attack_steps=2',
             '--config.log_every=1']
    done = subprocess.run(base + ['--workdir', str(tmp_path / 'r')] + flags, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 'step 2/2' in done.stdout and 'best PGD accuracy' in done.stdout
    rows = [json.loads(line) for line in open(tmp_path / 'r' / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [1, 2]


def test_a_run_saved_with_the_old_field_names_resumes_and_loads(tiny_runs, tmp_path):
    """A run whose config.json has the names before the shared vocabulary (data.real.*, data.hflip, the reference's
    per-update ema.decay) passes the config guard with today's config unchanged and loads through load_run with
    today's names; tau -> half-life keeps the float32 decay (0.995 at 512 -> 70,801 images, the schema default)."""
    from conftest import tiny_config
    from jaxdiff.engine import checkpoint as ckpt
    from jaxdiff.runs import load_run
    assert adversarial.halflife_of_tau(0.995, 512) == adversarial.adversarial_config().ema.halflife_img == 70_801
    for tau, batch in ((0.995, 512), (0.99, 128), (0.995, 256), (0.9, 16), (0.0, 64)):
        half = adversarial.halflife_of_tau(tau, batch)
        assert np.float32(decay_per_step(half, batch)) == np.float32(tau)
    workdir = str(tmp_path / 'old')
    shutil.copytree(tiny_runs('adversarial')[0], workdir)
    config = tiny_config('adversarial')
    saved = json.load(open(os.path.join(workdir, 'config.json')))
    data = saved['data']
    data['real'] = {k: data.pop(k) for k in ('source', 'path', 'tfds_name', 'split', 'resolution')}
    data['hflip'] = data.pop('xflip')
    del saved['ema']['halflife_img']
    saved['ema']['decay'] = 0.995                   # as the old schema wrote it; today: the half-life at batch 16
    json.dump(saved, open(os.path.join(workdir, 'config.json'), 'w'))
    with config.unlocked():
        config.ema.halflife_img = 2_212.52
    ckpt.check_config(workdir, config, False, write=False, schema=adversarial.adversarial_config(),
                      upgrade=adversarial.TASK.upgrade)
    with pytest.raises(ckpt.ConfigMismatchError, match=r'data.real.source'):  # without the renames: a change
        ckpt.check_config(workdir, config, False, write=False, schema=adversarial.adversarial_config())
    run = load_run(workdir)
    assert (run.config.data.source, run.config.data.xflip, run.step) == ('digits', True, 20)
    assert run.config.ema.halflife_img == 2_212.52


def test_an_unfinished_generated_folder_is_refused(tmp_path):
    """Training on part of the samples would change the run silently: a folder sample.py has not finished (manifest
    complete=false, or a listed shard missing) is refused in one line; the finished folder loads."""
    folder = _write_fake_samples(tmp_path / 'samples')
    images, labels = mixed_data.load_generated(folder, (8, 8, 1), 10)
    assert len(labels) == 96 and images[np.arange(3)].shape == (3, 8, 8, 1)
    images.close()
    manifest = json.load(open(os.path.join(folder, 'manifest.json')))
    json.dump(dict(manifest, complete=False), open(os.path.join(folder, 'manifest.json'), 'w'))
    with pytest.raises(ValueError, match=r'samples is incomplete: its sampling did not finish \(manifest '
                                         r'complete=false\); rerun its sample.py command to finish it$'):
        mixed_data.load_generated(folder, (8, 8, 1), 10)
