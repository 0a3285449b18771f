"""Any train.py run directory -> its task, config, dataset info, rebuilt network and chosen weights.

    run = load_run(workdir)                                  # EMA weights of the newest usable checkpoint
    run = load_run(workdir, use_ema=False, step=2000)
    run = load_run(workdir, checkpoint='best')               # adversarial runs: the keep-best checkpoint (best/)

The task (``config.task``: 'denoiser', 'noisy_classifier', 'adversarial', 'watermark_codec', 'feature_classifier'
or 'autoencoder') picks the network builder and the variables' layout: {'params'[, 'buffers']} for the diffusion
nets and the noisy classifier, {'params', 'batch_stats'} for the adversarially trained classifiers (flax
BatchNorm), {'params'} (no EMA) for the watermark codec and the metrics' feature classifiers (SmallCNN: x (B, H, W,
C) in [-1, 1] -> features, logits), {'params'} for the autoencoder (AutoencoderKL: ``encode`` / ``decode``; the
EMA weights when the run kept an EMA, else the params). A saved config in older field names is read in today's
(the task's ``upgrade``). sample.py, the evaluators, guidance, fine-tuning and watermark embedding load runs
through this one function.
A finished trigger run ('trigger') loads as the denoiser run it exported (``RUN/denoiser``: K + 1 classes, the
fine-tuned weights).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import ml_collections

from jaxdiff.tasks import registry
from jaxdiff.tasks.adversarial import BEST_DIR

LEGACY_CODEC_FILE = 'checkpoint.msgpack'  # the watermark codec's checkpoint before the engine
TASKS = ('denoiser', 'noisy_classifier', 'adversarial', 'watermark_codec', 'trigger', 'feature_classifier',
         'autoencoder')
TRIGGER_DENOISER_DIR = 'denoiser'  # a finished trigger run's model as a denoiser run (jaxdiff.tasks.trigger)

def wrong_kind(workdir: str, task: str, want: str) -> str:
    """The one line for a run of task ``task`` passed where a ``want`` run is needed: what it is, what it serves,
    how to train the wanted kind."""
    def a(kind: str) -> str:
        return f'an {kind}' if kind[0] in 'aeiou' else f'a {kind}'
    have, need = registry.get(task), registry.get(want)
    return (f'{workdir} is {a(have.kind)} run, not {a(need.kind)} run ({have.use.format(dir=workdir)}); train '
            f'{a(need.kind)} with python train.py --config {need.configs} --workdir NEW_RUN')


class Run(NamedTuple):
    """A loaded run. variables: the chosen weights in the layout ``net.apply`` takes; step: the checkpoint's step;
    checkpoint: 'latest', 'best' or 'step N'."""
    task: str
    config: ml_collections.ConfigDict
    info: Any                 # jaxdiff.data.sources.DatasetInfo: resolution, channels, num_classes, size
    net: Any
    variables: dict
    step: int
    checkpoint: str
    workdir: str


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The saved config.json of run ``workdir`` in today's field names (the task's ``upgrade``); one-line
    FileNotFoundError / ValueError for a missing directory or a task jaxdiff does not load."""
    from jaxdiff.engine import checkpoint as ckpt
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f'run directory not found: {workdir!r}; pass the --workdir of a train.py run')
    saved = ckpt.read_config(workdir)
    task = registry.task_name(saved)
    if task not in TASKS:
        raise ValueError(f'{workdir} is a {task!r} run; jaxdiff loads runs of the tasks {", ".join(TASKS)}')
    return ml_collections.ConfigDict(registry.get(task).upgrade(saved))  # older field names -> today's


def load_run(workdir: str, *, use_ema: bool = True, step: Optional[int] = None, checkpoint: str = 'latest',
             want: Optional[str] = None) -> Run:
    """config.json + dataset_info.json + a checkpoint of a train.py run -> :class:`Run`, for every task.

    use_ema: the EMA weights (else the raw params); step: a checkpoint step (None = the newest usable one);
    checkpoint: 'latest', or 'best' for an adversarial run's keep-best checkpoint (``RUN/best``); want: the task the
    caller needs (a finished trigger run counts as the denoiser it exported): another task is a ValueError
    (:func:`wrong_kind`) before any weights are read.
    Raises FileNotFoundError / ValueError / CheckpointError with one-line messages.
    """
    from jaxdiff.engine import checkpoint as ckpt
    config = load_config(workdir)
    task = registry.task_name(config)
    if checkpoint not in ('latest', 'best'):
        raise ValueError(f"checkpoint={checkpoint!r}: use 'latest' or 'best'")
    if task == 'trigger':  # a trigger run loads as the denoiser it exported when it finished
        export = os.path.join(workdir, TRIGGER_DENOISER_DIR)
        if not os.path.isdir(export):
            raise FileNotFoundError(f'{workdir} is a trigger run that has not finished (no {TRIGGER_DENOISER_DIR}/ '
                                    'yet); rerun its command to finish it')
        return load_run(export, use_ema=use_ema, step=step, checkpoint=checkpoint, want=want)
    folder = workdir
    if checkpoint == 'best':
        folder = os.path.join(workdir, BEST_DIR)
        if task != 'adversarial' or not os.path.isdir(os.path.join(folder, 'checkpoints')):
            raise FileNotFoundError(f'{workdir} has no best/ checkpoint (adversarial runs keep one once an evaluation '
                                    'ran); use the latest checkpoint (--checkpoint latest)')
    elif not os.path.isdir(os.path.join(workdir, 'checkpoints')):
        if os.path.isfile(os.path.join(workdir, LEGACY_CODEC_FILE)):
            raise ValueError(f'{workdir} holds {LEGACY_CODEC_FILE}: a watermark codec written by an older jaxdiff; '
                             'retrain with python train.py --config configs/watermark/digits.py --workdir NEW_RUN')
        raise ckpt.CheckpointError(f'{workdir} has no checkpoints/ folder; train first or pass another --workdir')
    if want is not None and task != want:
        raise ValueError(wrong_kind(workdir, task, want))
    info = _dataset_info(workdir, config)
    state = ckpt.load_arrays(folder, step)
    weights = state['ema'] if use_ema and 'ema' in state else state['params']  # the codec has no EMA
    if task == 'watermark_codec':  # its stored params are the codec's variables {'params': ...}
        from jaxdiff.watermark.codec import codec_from_config
        net, variables = codec_from_config(config), weights
    elif task == 'adversarial':
        from jaxdiff.robust import adv_step
        net, variables = adv_step.build_net(config, info), {'params': weights, 'batch_stats': state['buffers']}
    elif task == 'feature_classifier':  # the metrics' SmallCNN (no EMA)
        from jaxdiff.metrics import feature_classifier as fc
        net, variables = fc.network(fc.classifier_spec(config.classifier)), {'params': weights}
    elif task == 'autoencoder':  # AutoencoderKL; weights: the EMA only when the run kept one (ema.halflife_img)
        from jaxdiff.nets.from_config import build_autoencoder
        net, variables = build_autoencoder(config, info), {'params': weights}
    else:
        from jaxdiff.nets.from_config import build_net
        net, variables = build_net(config, info), {'params': weights}
        if state.get('buffers'):
            variables['buffers'] = state['buffers']
    label = checkpoint if step is None else f'step {step}'
    return Run(task, config, info, net, variables, int(state['step']), label, workdir)


def _dataset_info(workdir: str, config):
    """The run's DatasetInfo: dataset_info.json, or (runs trained before it existed) the dataset read once."""
    from jaxdiff.engine import checkpoint as ckpt
    info = ckpt.read_dataset_info(workdir)
    if info is not None:
        return info
    if registry.task_name(config) in ('adversarial', 'watermark_codec', 'feature_classifier', 'autoencoder'):
        raise FileNotFoundError(f'{workdir} has no {ckpt.INFO_FILE}: the run never started training or '
                                'predates that file; train it (again) with train.py')
    from jaxdiff.data.pipeline import make_iterator  # not tasks.denoiser: tasks load runs (latent decoders)
    return make_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)[1]
