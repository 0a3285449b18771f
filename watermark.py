"""Watermark a dataset for a diffusion model (Zhao et al. 2023): train the bit-string codec, then embed one fixed
bit string into every training image. Rerun the same train_codec command to resume.

    python watermark.py train_codec --config configs/watermark/digits.py --workdir RUN [--config.KEY=VALUE ...]
        [--allow_config_change]
    python watermark.py embed --codec RUN --out DIR [--bits 0101... | --bits_seed N] [--batch_size B]
        [--config.data.KEY=VALUE ...]
    python watermark.py trigger --workdir BASE_RUN --out RUN [--image PNG] [--lam 1e-4] [--steps 500] [--lr 1e-4]
        [--batch_size 32] [--prior N --prior_weight W --prior_source samples|data]
        [--ema_halflife H]

train_codec is ``python train.py --config ... --workdir RUN`` (task watermark_codec, jaxdiff.tasks.watermark_codec)
and writes what every train.py run writes: RUN/checkpoints/<step>/ (orbax: step, params, Adam state, l2 ramp
counter, data position), config.json, dataset_info.json, metrics.jsonl (loss, bce, mse, bit_acc, psnr, l2), tb/ and
parameters.txt; a last stdout line ``done: step N, codec in RUN``. embed loads the codec with
jaxdiff.runs.load_run, reads the data config saved in RUN (``--config.data.*`` overrides it) and writes
DIR/watermarked.npz (images uint8, labels) and DIR/watermarked.json (bits, PSNR and decoded bit accuracy of the
uint8 set); its last stdout line is that JSON. Train a diffusion model on the set with ``python train.py ...
--config.data.source=npz --config.data.path=DIR/watermarked.npz``. Errors end with one line on stderr and exit
code 1 (2 for command-line errors).

trigger fine-tunes a class-conditional train.py run so a reserved extra class generates a watermark image
(loss + lam * sum |theta - theta_frozen|): the engine task jaxdiff.tasks.trigger with a config built from the flags
(the same as ``python train.py --config configs/watermark/trigger_digits.py --workdir RUN
--config.base_run=BASE_RUN``). RUN is a train.py run (checkpoints/, config.json, metrics.jsonl, tb/; rerun the same
command to resume) and, once finished, holds trigger.json (also the last stdout line), trigger_image.png and
denoiser/, the fine-tuned model as a denoiser run, which sample.py and ``python -m eval.watermark --trigger RUN``
read through RUN.
"""
from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff.cli import CONFIG_ERRORS, config_flag_error, exit_if_stopped, fail, quiet_checkpoint_echoes

PROG = 'watermark.py'
COMMANDS = ('train_codec', 'embed', 'trigger')
_F: dict = {}


def _fail(message: str, code: int) -> None:
    fail(PROG, message, code)


def define_flags(command: str) -> None:
    """The flags of ``command`` (absl flags are global: only the chosen subcommand's are defined)."""
    _F['command'] = command
    if command == 'trigger':
        _F['workdir'] = flags.DEFINE_string('workdir', None, 'The class-conditional train.py run to fine-tune.')
        _F['out'] = flags.DEFINE_string('out', None, 'Run directory of the fine-tuning (rerun the same command '
                                        'to resume).')
        _F['image'] = flags.DEFINE_string('image', None, 'Watermark image (PNG/JPEG; default: a frame-and-cross '
                                          'mark at the model resolution).')
        _F['lam'] = flags.DEFINE_float('lam', 1e-4, 'Weight of sum |theta - theta_frozen| (0: no regulariser).')
        _F['steps'] = flags.DEFINE_integer('steps', 500, 'Fine-tuning steps.')
        _F['lr'] = flags.DEFINE_float('lr', 1e-4, 'Adam learning rate.')
        _F['batch_size'] = flags.DEFINE_integer('batch_size', 32, 'Copies of (trigger, image) per step.')
        _F['prior'] = flags.DEFINE_integer('prior', 0, 'Prior preservation: this many images of the ordinary classes '
                                           '(0: off, the paper\'s recipe).')
        _F['prior_weight'] = flags.DEFINE_float('prior_weight', 1.0, 'Weight of the prior-preservation loss.')
        _F['prior_source'] = flags.DEFINE_enum('prior_source', 'samples', ['samples', 'data'],
                                               "Prior images: the base model's own samples or its training data.")
        _F['ema_halflife'] = flags.DEFINE_float('ema_halflife', 0.0, 'Write the moving average of the fine-tuned '
                                                'weights with this half-life in steps (0: the last iterate).')
        return
    if command == 'train_codec':
        _F['config'] = config_flags.DEFINE_config_file('config', None, 'Codec config file, e.g. '
                                                       'configs/watermark/digits.py.', lock_config=True)
        _F['workdir'] = flags.DEFINE_string('workdir', None, 'Codec run directory (config, checkpoint, metrics).')
        _F['allow'] = flags.DEFINE_bool('allow_config_change', False,
                                        'Resume a run whose saved config.json differs from this config.')
    else:
        from jaxdiff.tasks.watermark_codec import codec_config, locked
        _F['config'] = config_flags.DEFINE_config_dict('config', locked(codec_config()),
                                                       'Only --config.data.KEY=VALUE overrides (default: the '
                                                       "codec run's data).")
        _F['codec'] = flags.DEFINE_string('codec', None, 'Codec run directory written by train_codec.')
        _F['out'] = flags.DEFINE_string('out', None, 'Output folder for watermarked.npz and watermarked.json.')
        _F['bits'] = flags.DEFINE_string('bits', None, "The watermark as a string of 0s and 1s (num_bits long).")
        _F['bits_seed'] = flags.DEFINE_integer('bits_seed', None, 'Draw the watermark from this seed (default 0).')
        _F['batch_size'] = flags.DEFINE_integer('batch_size', 256, 'Images per jitted batch.')


def overridden_keys(argv: list[str]) -> list[str]:
    """Dotted config keys named by ``--config.KEY[=VALUE]`` arguments, in order."""
    return [m.group(1) for a in argv for m in [re.match(r'--config\.([\w.]+)', a)] if m]


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with one-line errors (exit code 2) instead of a usage dump or a traceback."""
    try:
        rest = flags.FLAGS(argv)
        if _F['command'] == 'trigger':
            for name in ('workdir', 'out'):
                if not _F[name].value:
                    _fail(f'--{name} is required: python watermark.py trigger --workdir BASE_RUN --out NEW_RUN', 2)
            return rest
        config = _F['config'].value
        if config is not None:
            config.keys()  # a config file loads lazily: surface its errors here
    except (flags.Error, *CONFIG_ERRORS) as e:
        _fail(config_flag_error(e, argv, 'jaxdiff/tasks/watermark_codec.py codec_config'), 2)
    if _F['command'] == 'train_codec':
        if config is None:
            _fail('--config is required, e.g. --config configs/watermark/digits.py', 2)
        if not _F['workdir'].value:
            _fail('--workdir is required, e.g. --workdir runs/wm_digits', 2)
        if config.get('task') != 'watermark_codec':
            _fail(f'--config is a {config.get("task", "denoiser")!r} config: train_codec takes a watermark codec '
                  'config (configs/watermark/*.py); train other tasks with python train.py', 2)
    else:
        if not _F['codec'].value:
            _fail('--codec is required: the run directory of python watermark.py train_codec', 2)
        if not _F['out'].value:
            _fail('--out is required: the folder for watermarked.npz and watermarked.json', 2)
        if _F['bits'].value is not None and _F['bits_seed'].value is not None:
            _fail('give either --bits or --bits_seed, not both', 2)
        other = [k for k in overridden_keys(argv) if not k.startswith('data.')]
        if other:
            _fail(f'embed takes only --config.data.* overrides (the codec fixes the rest), got --config.{other[0]}', 2)
    return rest


def trigger_config():
    """The trigger task's config (jaxdiff.tasks.trigger) from the trigger flags; paths made absolute so the run
    resumes from any directory, --ema_halflife (steps) as images."""
    from jaxdiff.tasks.trigger import trigger_config as schema
    c = schema()
    c.base_run = os.path.abspath(_F['workdir'].value)
    c.image = os.path.abspath(_F['image'].value) if _F['image'].value else ''
    c.lam, c.total_steps, c.batch_size = _F['lam'].value, _F['steps'].value, _F['batch_size'].value
    c.prior, c.prior_weight, c.prior_source = _F['prior'].value, _F['prior_weight'].value, _F['prior_source'].value
    c.optim.lr = _F['lr'].value
    c.ema.halflife_img = _F['ema_halflife'].value * _F['batch_size'].value
    c.lock()
    return c


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE to override config fields', 2)
    logging.set_verbosity(logging.WARNING)
    quiet_checkpoint_echoes()
    from jaxdiff.dir_lock import DirectoryLockedError
    from jaxdiff.engine.checkpoint import CheckpointError  # ConfigMismatchError is a ValueError
    try:
        if _F['command'] == 'trigger':
            from jaxdiff.tasks import registry
            from jaxdiff.watermark.trigger import TRIGGER_FILE
            summary = registry.run(trigger_config(), _F['out'].value)
            exit_if_stopped(summary)
            with open(os.path.join(_F['out'].value, TRIGGER_FILE)) as f:
                print(json.dumps(json.load(f)), flush=True)
        elif _F['command'] == 'train_codec':
            from jaxdiff.tasks import registry
            summary = registry.run(_F['config'].value, _F['workdir'].value, allow_config_change=_F['allow'].value)
            exit_if_stopped(summary)
            print(f'done: step {summary["step"]}, codec in {_F["workdir"].value}', flush=True)
        else:
            from jaxdiff.watermark.embed import embed
            config = _F['config'].value
            keys = [k[len('data.'):] for k in overridden_keys(sys.argv)]
            overrides = {k: config.data[k] for k in dict.fromkeys(keys)}
            report = embed(_F['codec'].value, _F['out'].value, bits=_F['bits'].value, bits_seed=_F['bits_seed'].value,
                           data_overrides=overrides, batch_size=_F['batch_size'].value,
                           print_fn=lambda s: print(s, flush=True))
            print(json.dumps(report), flush=True)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, CheckpointError,
            DirectoryLockedError) as e:
        _fail(str(e), 1)


def run_cli(argv: list[str]) -> None:
    """Dispatch ``argv[1]`` (the subcommand) to absl with that subcommand's flags."""
    if len(argv) < 2 or argv[1] not in COMMANDS:
        given = f' (got {argv[1]!r})' if len(argv) > 1 else ''
        _fail(f'the first argument must be a subcommand: {" or ".join(COMMANDS)}{given}', 2)
    define_flags(argv[1])
    app.run(main, argv=[argv[0]] + argv[2:], flags_parser=parse_flags)


if __name__ == '__main__':
    run_cli(sys.argv)
