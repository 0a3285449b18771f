"""Train any task (diffusion model, classifiers, adversarial training ...) from a config file; rerun the same
command to resume.

    python train.py --config configs/diffusion/digits.py --workdir runs/digits [--config.KEY=VALUE ...]
        [--allow_config_change] [--coordinator_address HOST:PORT --num_processes N --process_id I]

Outputs in --workdir: checkpoints/<step>/ (orbax), config.json, tb/ (TensorBoard), samples/step_XXXXXXX.png.
Multi-host: pass the three --coordinator_address/--num_processes/--process_id flags on every process, or none of
them on a TPU pod / SLURM job (jax.distributed detects the cluster). Errors in the config, the data or the
checkpoints end with one line on stderr and a non-zero exit code (2 for command-line errors, 1 otherwise). A run that
SIGTERM / SIGINT stopped saves its step and exits 143 / 130 (128 + the signal): rerun to resume. A second train.py
on the same --workdir is refused (exit 1) while the first runs.
"""
from __future__ import annotations


from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff.cli import CONFIG_ERRORS, config_flag_error, exit_if_stopped, fail, quiet_checkpoint_echoes

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/diffusion/digits.py.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, config.json, tb/, samples/).')
_ALLOW = flags.DEFINE_bool('allow_config_change', False,
                           'Resume a workdir whose saved config.json differs from this config.')
_COORD = flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
_NPROC = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process index (0 .. num_processes-1).')


def _fail(message: str, code: int) -> None:
    fail('train.py', message, code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit code 2) instead of absl's usage dump or a traceback."""
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.keys()  # the config file loads lazily: surface its errors here
    except (flags.Error, *CONFIG_ERRORS) as e:
        _fail(config_flag_error(e, argv, "its task's schema: jaxdiff/config.py for diffusion, "
                                         'jaxdiff/tasks/<task>.py for the others'), 2)
    if config is None:
        _fail('--config is required, e.g. --config configs/diffusion/digits.py', 2)
    if not _WORKDIR.value:
        _fail('--workdir is required, e.g. --workdir runs/digits', 2)
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f'unexpected arguments {argv[1:]}; use --config.KEY=VALUE to override config fields', 2)
    logging.set_verbosity(logging.WARNING)
    quiet_checkpoint_echoes()
    if not _PID.value:  # process 0 (or the only one) says what the first seconds are spent on
        print(f'train.py: loading JAX and task {_CONFIG.value.get("task", "denoiser")!r} (data, model) ...', flush=True)
    from jaxdiff import parallel
    from jaxdiff.dir_lock import DirectoryLockedError
    from jaxdiff.engine import checkpoint as ckpt

    try:
        parallel.initialize(_COORD.value, _NPROC.value, _PID.value)
        from jaxdiff.tasks import registry
        summary = registry.run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ckpt.CheckpointError,
            DirectoryLockedError) as e:
        _fail(str(e), 1)
    import jax
    if jax.process_count() > 1:
        print(f'process {jax.process_index()}/{jax.process_count()}: step {summary["step"]}, params+ema checksum '
              f'{summary["checksum"]}', flush=True)
    exit_if_stopped(summary)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
