"""Task ``feature_classifier``: the metrics' feature classifiers (:data:`jaxdiff.metrics.feature_classifier.
CLASSIFIERS`: a :class:`~jaxdiff.nets.classifier.SmallCNN` per small dataset) trained with their fixed recipe.

    python train.py --config configs/classifier/digits_features.py --workdir runs/digits_features

:func:`jaxdiff.tasks.feature_classifier.load_or_train` (below) runs this task in its cache folder; a train.py run is the
same run in another folder.

The recipe: Adam with the lr cosine-decayed to 0 over the run, softmax cross-entropy, ``epochs`` epochs of
floor(N_train / batch_size) steps (the remainder of each epoch dropped, so every step has one shape). Data order:
epoch e visits the train split in the (e+1)-th permutation drawn from ``np.random.default_rng(seed)``, so the
global batch of step s depends on (seed, s, data) alone and a resumed run repeats the uninterrupted one.

Init key: ``jax.random.key(seed)``, not the engine's ``keys.init`` (a split of it), and no per-step key (the step
draws nothing): the weights are bitwise those of the loop this task replaced, so Fréchet distances computed with
them (README's demo rows) do not move.

Recipe fields: ``batch_size``, ``epochs`` and ``optim.lr`` at 0 take the registry entry's value
(:func:`recipe`), so the registry stays the one place a recipe is written and ``--config.classifier=NAME`` alone
trains NAME's recipe; :func:`classifier_config` writes the values out (the cache's config.json then names them,
and a registry change is a config change the engine refuses to resume across).

Outputs in the workdir, besides the engine's (checkpoints/ with {step, params, opt_state}, config.json,
metrics.jsonl, tb/): ``classifier.json`` {name, accuracy (held-out top-1), seed, step, data_fingerprint, recipe,
jaxdiff_version}, written once the last checkpoint is committed.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import jaxdiff
from jaxdiff import config_ranges as ranges
from jaxdiff import files, parallel
from jaxdiff.data.sources import DatasetInfo
from jaxdiff.engine import checkpoint as ckpt
from jaxdiff.engine import loop
from jaxdiff.engine.task import Callback, RunKeys, Setup, Task
from jaxdiff.metrics import feature_classifier as fc


def feature_classifier_config() -> ml_collections.ConfigDict:
    """Every field of a feature-classifier run with its default: the digits classifier's registry recipe."""
    c = ml_collections.ConfigDict()
    c.task = 'feature_classifier'   # a metrics feature classifier (jaxdiff.tasks.feature_classifier)
    c.seed = 0                      # init key jax.random.key(seed) and the epochs' order (np default_rng(seed))
    c.classifier = 'digits_classifier'  # entry of jaxdiff.metrics.feature_classifier.CLASSIFIERS: data and network
    c.batch_size = 0                # global batch (0 = the entry's: digits 64, Fashion-MNIST 128)
    c.epochs = 0                    # epochs of floor(N_train / batch_size) steps (0 = the entry's: 20, 2)
    c.checkpoint_every = 500        # steps between checkpoints (also at the end and on SIGTERM/SIGINT)
    c.keep_checkpoints = 1          # recent checkpoints kept (the weights are the last one's)
    c.log_every = 50                # steps between progress lines / metrics.jsonl rows

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.0                # Adam lr at step 0, cosine-decayed to 0 over the run (0 = the entry's: 3e-3)

    c.parallel = ml_collections.ConfigDict()
    c.parallel.fsdp = 1             # size of the mesh's fsdp axis (params and optimizer state sharded over it)
    return c


class Recipe(NamedTuple):
    """The training hyperparameters of a run, the config's where set, else the registry entry's."""
    batch_size: int
    epochs: int
    lr: float


def recipe(config) -> Recipe:
    """config.batch_size / epochs / optim.lr, each 0 replaced by the value of config.classifier's entry."""
    spec = fc.classifier_spec(config.classifier)
    return Recipe(batch_size=int(config.batch_size) or spec.batch_size, epochs=int(config.epochs) or spec.epochs,
                  lr=float(config.optim.lr) or spec.learning_rate)


def classifier_config(name: str) -> ml_collections.ConfigDict:
    """The schema with ``classifier=name`` and that entry's recipe written out (what load_or_train trains)."""
    c = feature_classifier_config()
    c.classifier = name
    c.batch_size, c.epochs, c.optim.lr = recipe(c)
    return c


def check(config) -> None:
    """One clear ValueError for a config no run can use (unknown fields or classifier, negative recipe values)."""
    extra = sorted(set(config.keys()) - set(feature_classifier_config().keys()))
    if extra:
        raise ValueError(f'config has field(s) {extra} that task=feature_classifier does not use; start the config '
                         'from jaxdiff.tasks.feature_classifier.feature_classifier_config()')
    fc.classifier_spec(config.classifier)  # raises, naming the known classifiers
    for name, value in (('batch_size', config.batch_size), ('epochs', config.epochs), ('optim.lr', config.optim.lr)):
        if value < 0:
            raise ValueError(f"config.{name}={value} must be >= 0 (0 = the registry entry's value)")


# ------------------------------------------------------------------------------------------------------ data

class EpochBatches:
    """The engine's Batches over a train split: step s of epoch e = s // steps_per_epoch takes rows
    [i B, (i + 1) B) (i = s mod steps_per_epoch) of epoch e's permutation, the (e+1)-th drawn from
    ``np.random.default_rng(seed)``; this process reads its 1/P of them. Permutations are drawn once and kept."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, fingerprint: str):
        self.images, self.labels, self.batch_size, self.fingerprint = images, labels, batch_size, fingerprint
        self.steps_per_epoch = len(images) // batch_size
        self.rng, self.orders = np.random.default_rng(seed), []
        self.rows = parallel.host_rows(batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """(N,) int64: the permutation epoch ``epoch`` visits the images in."""
        while len(self.orders) <= epoch:
            self.orders.append(self.rng.permutation(len(self.images)))
        return self.orders[epoch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step ``step``: image uint8 (B / P, H, W, C), label int32 (B / P,)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        index = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size][self.rows]
        return dict(image=self.images[index], label=self.labels[index])

    def get_state(self) -> dict:
        """{'data_fingerprint'}: the order is a function of the step, so only the data are worth checking."""
        return {'data_fingerprint': self.fingerprint}

    def set_state(self, state: dict) -> str:
        """'' when the checkpoint saw the same data, else a warning line (the run goes on)."""
        if state.get('data_fingerprint') != self.fingerprint:
            return (f"warning: the training data differ from the checkpoint's (fingerprint "
                    f"{state.get('data_fingerprint')} -> {self.fingerprint}): the run goes on with the new data")
        return ''


# ------------------------------------------------------------------------------------------------------ step

def init_state(module, image_shape: tuple[int, int, int], tx: optax.GradientTransformation, seed: int,
               key: jax.Array) -> dict:
    """Fresh state {step int32 (), params, opt_state} from ``module.init(jax.random.key(seed), zeros (1, H, W, C))``.

    ``key`` (the engine's init key) is unused: the seed's own key keeps the weights of the replaced loop.
    """
    del key
    params = module.init(jax.random.key(seed), jnp.zeros((1,) + image_shape))['params']
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(module, tx: optax.GradientTransformation, schedule: optax.Schedule, steps_per_epoch: int,
               state: dict, batch: dict, key: jax.Array) -> tuple[dict, dict]:
    """One Adam step of mean softmax cross-entropy on batch {image uint8 (B, H, W, C), label int32 (B,)}; returns
    the new state and {loss, lr (of this step), epoch (fractional, after the step)}. ``key`` is unused."""
    del key

    def loss_fn(params):
        logits = module.apply({'params': params}, fc.to_unit(batch['image']))['logits']
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    step = state['step'] + 1
    new_state = dict(step=step, params=optax.apply_updates(state['params'], updates), opt_state=opt_state)
    return new_state, dict(loss=loss, lr=schedule(state['step']), epoch=step / steps_per_epoch)


# ------------------------------------------------------------------------------------------------------ task

def heldout_accuracy(name: str, heldout: tuple[np.ndarray, np.ndarray], state: dict) -> float:
    """Top-1 accuracy of ``state``'s params (any sharding, any process count) on heldout = (images, labels)."""
    params = parallel.global_to_host(state['params'])
    return fc.top1_accuracy(fc.make_feature_net(name, {'params': params}), *heldout)


def setup(config, workdir: str, mesh, keys: RunKeys) -> Setup:
    """Train / held-out splits, SmallCNN, Adam + cosine schedule, the held-out accuracy callback and the
    classifier.json writer."""
    name, spec, hyper = config.classifier, fc.classifier_spec(config.classifier), recipe(config)
    train, heldout = fc.dataset_split(name, 'train'), fc.dataset_split(name, 'heldout')
    if len(train[0]) < hyper.batch_size:
        raise ValueError(f'config.batch_size={hyper.batch_size} exceeds the {len(train[0])} training images of '
                         f'{name}; lower it')
    fingerprint = fc.data_fingerprint(*train, *heldout)
    data = EpochBatches(*train, hyper.batch_size, int(config.seed), fingerprint)
    total_steps = hyper.epochs * data.steps_per_epoch
    schedule = optax.cosine_decay_schedule(hyper.lr, total_steps)
    tx, module = optax.adam(schedule), fc.network(spec)
    result: dict = {}
    record = dict(name=name, seed=int(config.seed), data_fingerprint=fingerprint,
                  recipe=dict(fc.recipe_of(spec), batch_size=hyper.batch_size, epochs=hyper.epochs,
                              learning_rate=hyper.lr),
                  jaxdiff_version=jaxdiff.__version__)

    def evaluate(step: int, state: dict) -> dict:
        result['accuracy'] = heldout_accuracy(name, heldout, state)
        return dict(heldout_accuracy=result['accuracy'])

    def done(state: dict) -> dict:
        if int(jax.device_get(state['step'])) < total_steps:  # stopped by a signal: nothing to record yet
            return {}
        if 'accuracy' not in result:  # resumed after the last step: the callback did not run
            evaluate(total_steps, state)
        if jax.process_index() == 0:
            files.write_json(os.path.join(workdir, fc.RESULT_FILE),
                             dict(record, accuracy=result['accuracy'], step=total_steps))
        return dict(accuracy=result['accuracy'])

    describe = [f'{name}: SmallCNN {tuple(spec.net_channels)} -> {spec.feature_dim} features on '
                f'{len(train[0])} train images {train[0].shape[1:]} ({spec.split}); {data.steps_per_epoch} '
                f'steps/epoch x {hyper.epochs} epochs, Adam lr {hyper.lr:g} cosine-decayed to 0']
    return Setup(init=functools.partial(init_state, module, train[0].shape[1:], tx, int(config.seed)),
                 step=functools.partial(train_step, module, tx, schedule, data.steps_per_epoch),
                 data=data, batch_size=hyper.batch_size, total_steps=total_steps, describe=describe,
                 callbacks=[Callback('heldout_accuracy', 0, evaluate, at_end=True)],
                 progress=dict(epoch='.2f', lr='.2e'), last=('lr', 'epoch'), nan_policy='raise', done=done,
                 info=DatasetInfo(spec.resolution, spec.channels, spec.num_classes, len(train[0])))



# The valid values of every field of :func:`feature_classifier_config` (checked before any work:
# jaxdiff.config_ranges); 0 takes the registry entry's batch size, epochs and lr.
RANGES: dict[str, ranges.Rule] = {
    **ranges.COMMON, 'task': ranges.one_of('feature_classifier'), 'classifier': ranges.one_of(*fc.CLASSIFIERS),
    'batch_size': ranges.at_least(0, integer=True), 'epochs': ranges.at_least(0, integer=True),
    'optim.lr': ranges.NON_NEGATIVE,
}
TASK = Task('feature_classifier', feature_classifier_config, check, setup, ranges=RANGES, kind='feature classifier',
            use='eval.fid uses it by name (--features)', configs='configs/classifier/*_features.py')


# ----------------------------------------------------------------------------------------------- the cache

def cache_folder(name: str, cache_dir: str | None = None) -> str:
    """The cached run of classifier ``name``: ``<root>/classifiers/<name>``, root = ``cache_dir``, else
    ``$JAXDIFF_CACHE``, else ``~/.cache/jaxdiff``."""
    root = cache_dir or os.environ.get('JAXDIFF_CACHE') or os.path.expanduser('~/.cache/jaxdiff')
    return os.path.join(root, 'classifiers', name)


def _read_run(name: str, workdir: str) -> fc.FeatureNet:
    """The FeatureNet of the finished run in ``workdir``; raises if its record or checkpoint is unreadable, from
    another classifier, recipe or seed, or does not fit the network."""
    spec = fc.classifier_spec(name)
    with open(os.path.join(workdir, fc.RESULT_FILE)) as f:
        record = json.load(f)
    if (record['name'], record['seed']) != (name, fc.DEFAULT_SEED):
        raise ValueError(f"it is {record['name']} with seed {record['seed']}, not {name} with seed {fc.DEFAULT_SEED}")
    if record['recipe'] != fc.recipe_of(spec):
        raise ValueError('it was trained with a different recipe')
    state = ckpt.load_arrays(workdir)
    if int(state['step']) != record['step']:
        raise ValueError(f"its newest checkpoint is step {int(state['step'])}, its record says {record['step']}")
    template = jax.eval_shape(fc.network(spec).init, jax.random.key(0),
                              jnp.zeros((1, spec.resolution, spec.resolution, spec.channels)))
    variables = {'params': state['params']}
    if jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables) != jax.tree.map(
            lambda a: (tuple(a.shape), str(a.dtype)), template):
        raise ValueError('the stored arrays do not fit the network')
    return fc.make_feature_net(name, jax.tree.map(jnp.asarray, variables), record['accuracy'])


class _LogLines(io.TextIOBase):
    """A text stream that hands each complete line to ``log`` (the engine's log stream: callers that write JSON to
    stdout want the progress lines elsewhere)."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__()
        self.log, self.pending = log, ''

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split('\n')
        for line in lines:
            self.log(line)
        return len(text)


def _train(name: str, workdir: str, log: Callable[[str], None]) -> None:
    """Train (or resume) classifier ``name``'s registry recipe with seed DEFAULT_SEED in ``workdir`` through the
    engine, its progress lines going to ``log``; RuntimeError (one line) when a signal stopped it."""
    config = classifier_config(name)
    config.seed = fc.DEFAULT_SEED
    summary = loop.run(TASK, config, workdir, stream=_LogLines(log))
    if summary['stopped_by_signal']:
        raise RuntimeError(f"training {name} stopped by a signal at step {summary['step']} (saved in {workdir}); "
                           'the next call resumes it')


def load_or_train(name: str, cache_dir: str | None = None, log: Callable[[str], None] = print) -> fc.FeatureNet:
    """The FeatureNet for registry entry ``name``, from its cached run (:func:`cache_folder`) or trained there with
    seed 0 by the engine (task ``feature_classifier``); an interrupted training resumes.

    The run is a cache, not user data: if it is unreadable, from another recipe, its config differs or every
    checkpoint is damaged, it is deleted and retrained, with a warning line. Files of the msgpack cache of
    earlier versions (``classifiers/<name>.msgpack``) are not read.
    """
    fc.classifier_spec(name)
    workdir = cache_folder(name, cache_dir)
    if os.path.exists(os.path.join(workdir, fc.RESULT_FILE)):
        try:
            return _read_run(name, workdir)
        except Exception as error:  # pylint: disable=broad-except  # any failure to read a cache means rebuild it
            log(f'warning: cached {name} in {workdir} is unusable ({type(error).__name__}: {error}); '
                'retraining and replacing it')
            shutil.rmtree(workdir)
    elif os.path.isdir(workdir):
        log(f'{name}: resuming its interrupted training in {workdir}')
    else:
        log(f'{name}: no cached weights; training it (seed {fc.DEFAULT_SEED}) in {workdir}')
    try:
        _train(name, workdir, log)
    except (ckpt.ConfigMismatchError, ckpt.CheckpointError) as error:
        log(f'warning: the interrupted training of {name} in {workdir} cannot resume ({error}); retraining')
        shutil.rmtree(workdir)
        _train(name, workdir, log)
    net = _read_run(name, workdir)
    log(f'{name}: held-out accuracy {net.accuracy:.4f}; cached in {workdir}')
    return net
