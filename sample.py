"""Sample a trained model into fixed-size, resumable shards; rerun the same command to finish an interrupted run.

    python sample.py --workdir RUN_DIR --out OUT_DIR --num_samples N [--seeds A-B] [--batch_size B]
        [--shard_size S] [--class_balanced | --labels L[,L...]] [--solver edm --num_steps 18 --S_churn 0 ...]
        [--guidance W | --guidance cfg:weight=W,schedule=linear ...] [--use_ema=true] [--step STEP]
        [--grid grid.png] [--array_record] [--filter_memorized L] [--filter_top P --filter_classifier NAME]
        [--coordinator_address HOST:PORT --num_processes N --process_id I]

--guidance NAME:key=value reaches every transform of jaxdiff.transforms.registry (listed by --helpfull).
--workdir is a train.py run directory or a folder written by ``python -m jaxdiff.nets.convert`` (an official EDM
checkpoint). Sample i uses seed i alone: the same bytes whatever --batch_size, device count or host count. Output:
OUT_DIR/shard-XXXXX.npz (images uint8 NHWC, labels int32, seeds int64) and OUT_DIR/manifest.json. Every option of
every solver in jaxdiff.solvers is a flag (listed by --helpfull); settings can also come from a file with
--flagfile. --filter_memorized L (a train.py run only) then drops every sample whose normalised distance to the
run's training images (Carlini et al.'s l, as eval.memorization computes it) is below L, and --filter_top keeps the
best P of each class of the rest: the result goes to OUT/unmemorized, OUT/topX or OUT/unmemorized_topX, with a
manifest of what each filter removed. Errors end with one line on stderr and exit code 1 (2 for command-line
errors).
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from jaxdiff.sampling import options
from jaxdiff.cli import UsageError, fail, quiet_checkpoint_echoes
from jaxdiff.transforms import registry

_WORKDIR = flags.DEFINE_string('workdir', None, 'train.py run directory, or a converted EDM checkpoint folder.')
_OUT = flags.DEFINE_string('out', None, 'Output folder for the shards and manifest.json.')
_NUM = flags.DEFINE_integer('num_samples', None, 'Number of samples (seeds 0..N-1 unless --seeds is given).')
_SEEDS = flags.DEFINE_string('seeds', None, 'Seed range A-B (inclusive), e.g. 0-49999.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Samples per batch on this process (multiple of its devices).')
_SHARD = flags.DEFINE_integer('shard_size', 10_000, 'Samples per shard file.')
_BALANCED = flags.DEFINE_bool('class_balanced', False, 'Label of seed s is s % num_classes (default: random).')
_LABELS = flags.DEFINE_string('labels', None, 'Class index or comma list, cycled over seeds (default: random).')
_SOLVER = flags.DEFINE_enum('solver', 'edm', list(options.SOLVERS), 'Sampler (jaxdiff.solvers).')
_GUIDANCE = flags.DEFINE_multi_string('guidance', [], 'Denoiser transform, repeatable, applied in order: W '
                                      '(= cfg:weight=W) or NAME:key=value,... e.g. cfg:weight=2,schedule=linear,'
                                      'negative=3; classes are indices, run=DIR a noise-conditional classifier run. '
                                      'NAME is one of:\n' + registry.usage())
_EMA = flags.DEFINE_bool('use_ema', True, 'Sample from the EMA params (train.py runs).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of a train.py run (default: the newest usable).')
_GRID = flags.DEFINE_string('grid', None, 'Also write a PNG grid of the first (up to 100) samples here.')
_RECORD = flags.DEFINE_bool('array_record', False, 'Also write array_record shards (OUT/records/) for grain.')
_TOP = flags.DEFINE_float('filter_top', None, 'Keep the top P (0..1] per class by the classifier into OUT/topX.')
_MEMORIZED = flags.DEFINE_float('filter_memorized', None, 'Drop samples with normalised distance l < L to the '
                                'run\'s training images (Carlini et al.: 1) into OUT/unmemorized[_topX].')
_CLASSIFIER = flags.DEFINE_string('filter_classifier', 'digits_classifier', 'Classifier scoring p(class | image) '
                                  'for --filter_top (a jaxdiff.metrics.feature_classifier name).')
_COORD = flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process index (0 .. num_processes-1).')


def _define_solver_flags() -> dict:
    """One string flag per solver option (value parsed as a Python literal); unset flags keep solver defaults."""
    defined = {}
    for name, per_solver in sorted(options.all_options().items()):
        where = ', '.join(f'{s}={d!r}' for s, d in per_solver.items())
        defined[name] = flags.DEFINE_string(name, None, f'Solver option (defaults: {where}).')
    return defined


_SOLVER_FLAGS = _define_solver_flags()


def _fail(message: str, code: int) -> None:
    fail('sample.py', message, code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with one-line errors (exit code 2)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0], 2)
    if not _WORKDIR.value:
        _fail('--workdir is required (a train.py run directory or a converted EDM checkpoint folder)', 2)
    if not _OUT.value:
        _fail('--out is required (the folder for the sample shards)', 2)
    if _TOP.value is not None and not 0 < _TOP.value <= 1:
        _fail(f'--filter_top={_TOP.value} must lie in (0, 1]: the fraction of each class kept', 2)
    if _MEMORIZED.value is not None and not _MEMORIZED.value > 0:
        _fail(f'--filter_memorized={_MEMORIZED.value} must be positive (Carlini et al.\'s threshold on l is 1)', 2)
    return rest


def write_grid(out_dir: str, path: str) -> str:
    """PNG grid of the first (up to 100) samples of ``out_dir``, one column per class when conditional."""
    from PIL import Image

    from jaxdiff.sampling import shards
    from jaxdiff.tasks.sample_grid import class_layout, grid_image
    data = shards.read_shard(shards.shard_path(out_dir, 0))
    labels = data['labels'][:100]
    grid = grid_image(*class_layout(data['images'][:100], labels if (labels >= 0).all() else None))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f'unexpected arguments {argv[1:]}', 2)
    logging.set_verbosity(logging.WARNING)
    quiet_checkpoint_echoes()
    from jaxdiff import parallel
    from jaxdiff.sampling import generate, run, shards
    from jaxdiff.sampling.model import load_model
    from jaxdiff.dir_lock import DirectoryLockedError
    from jaxdiff.engine.checkpoint import CheckpointError

    solver_options = {name: options.parse_value(flag.value) for name, flag in _SOLVER_FLAGS.items()
                      if flag.value is not None}
    if _TOP.value is not None:  # checked now, not after sampling
        from jaxdiff.metrics.feature_classifier import classifier_spec
        try:
            classifier_spec(_CLASSIFIER.value)
        except ValueError as e:
            _fail(f'--filter_classifier: {e}', 2)
    try:  # command-line errors (exit 2), before any model is loaded
        first, end = shards.parse_seeds(_SEEDS.value, _NUM.value)
        options.check_flags(_SOLVER.value, solver_options, _GUIDANCE.value)
    except ValueError as e:
        _fail(str(e), 2)
    memorized = None
    if _MEMORIZED.value is not None:  # the training images are read before sampling: a bad run fails first
        from jaxdiff.evaluation.memorization import memorization_check, run_training_data
        from jaxdiff.runs import load_config
        try:
            memorized = memorization_check(run_training_data(load_config(_WORKDIR.value).data), _MEMORIZED.value)
        except (ValueError, FileNotFoundError) as e:
            _fail(f'--filter_memorized needs the training images of a train.py run: {e}', 2)
    try:
        parallel.initialize(_COORD.value, _NPROC.value, _PID.value)
        import jax
        model = load_model(_WORKDIR.value, use_ema=_EMA.value, step=_STEP.value)
        if jax.process_index() == 0:
            print('model: ' + ', '.join(f'{k} {v}' for k, v in model.description.items()), flush=True)
        labels = generate.make_labels(model.label_dim, _BALANCED.value, _LABELS.value)
        run.sample(model, _OUT.value, first=first, end=end, batch_size=_BATCH.value, shard_size=_SHARD.value,
                   solver=_SOLVER.value, solver_options=solver_options, transforms=_GUIDANCE.value, labels=labels,
                   array_record=_RECORD.value)
        if jax.process_index() == 0:
            print(f'done: {end - first:,} samples (seeds {first}-{end - 1}) in {os.path.abspath(_OUT.value)}',
                  flush=True)
            if _GRID.value:
                print(f'grid: {write_grid(_OUT.value, _GRID.value)}', flush=True)
            if _TOP.value is not None or memorized is not None:
                from jaxdiff.sampling.filter import filter_folder
                filter_folder(_OUT.value, _TOP.value, _CLASSIFIER.value, memorized=memorized, shard_size=_SHARD.value)
    except UsageError as e:  # a flag the loaded model cannot take
        _fail(str(e), 2)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError,
            DirectoryLockedError) as e:
        _fail(str(e), 1)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
