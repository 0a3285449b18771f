"""What every command-line entry point shares: ending with one clear error line, without library noise after it."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence


class UsageError(ValueError):
    """A value given on the command line that cannot be used, found only once a model or run is loaded (a class
    index beyond the model's classes, a solver range outside its sigma range): CLIs report it as a command-line
    error, exit code 2."""


def fail(prog: str, message: str, code: int) -> None:
    """Print ``<prog>: error: <message>`` (one line) on stderr and exit with ``code``.

    Exits with ``os._exit``, skipping interpreter teardown: libraries' background threads (orbax, tensorstore)
    would otherwise print noise after the line. Callers wait for their pending writes first.
    """
    print(f'{prog}: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


CONFIG_ERRORS = (KeyError, AttributeError, SyntaxError, OSError, ValueError, TypeError)  # + absl's flags.Error


def config_flag_error(exc: BaseException, argv: Sequence[str], schema_hint: str) -> str:
    """One line for an error raised while absl parses ``--config FILE`` and its ``--config.KEY=VALUE`` overrides:
    an unknown key (full dotted path, with ml_collections' 'did you mean'; ``schema_hint`` says where the fields are
    listed), a config file with a syntax error or without get_config(), an unreadable file, a bad value."""
    import re
    path = _flag_value(argv, 'config')
    text = str(exc.args[0]) if isinstance(exc, (KeyError, AttributeError)) and exc.args else str(exc)
    if isinstance(exc, SyntaxError):
        return f'--config {path}: syntax error at line {exc.lineno}: {exc.msg}; fix the file'
    if isinstance(exc, AttributeError) and "no attribute 'get_config'" in text:
        return (f'--config {path} defines no get_config(): a config file is a Python module whose get_config() '
                'returns an ml_collections.ConfigDict (see configs/)')
    unknown = re.search(r"Unknown command line flag '(config\.[^']+)'", text)
    if isinstance(exc, (KeyError, AttributeError)) or unknown:
        names = [unknown.group(1)[len('config.'):]] if unknown else re.findall(r'[A-Za-z_][\w.]*',
                                                                                text.splitlines()[0] if text else '')
        key = names[0] if names else text
        for arg in argv:  # report the full dotted path of the override that named it
            match = re.match(r'--config\.([\w.]+)', arg)
            if match and key.split('.')[-1] in match.group(1).split('.'):
                key = match.group(1)
                break
        hint = re.search(r'Did you mean "([\w.]+)"', text)
        return (f'unknown config key {key!r}: the config has no such field ('
                + (f'did you mean {hint.group(1)!r}? ' if hint else '') + f'every field is listed in {schema_hint})')
    if isinstance(exc, OSError):
        return f'cannot load --config: {text.strip().splitlines()[-1].strip() if text.strip() else path}'
    if isinstance(exc, (ValueError, TypeError)):
        return f'bad --config: {text}'
    return text.splitlines()[0] if text else 'bad command line'


def _flag_value(argv: Sequence[str], name: str) -> str:
    """The value of ``--name=V`` or ``--name V`` in ``argv`` ('' if absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f'--{name}='):
            return arg.split('=', 1)[1]
        if arg == f'--{name}' and i + 1 < len(argv):
            return argv[i + 1]
    return ''


def exit_if_stopped(summary: dict) -> None:
    """After a training run that a stop signal ended (saved, resumable): exit with the shell's code for that
    signal, 128 + its number (SIGTERM 143, SIGINT 130), so ``train.py ... && sample.py ...`` does not go on with
    a half-trained model. A finished run returns."""
    if summary.get('stopped_by_signal'):
        sys.stdout.flush()
        sys.exit(128 + int(summary['stop_signal']))


def _checkpoint_echo(exc) -> bool:
    """An echo of a damaged checkpoint's abandoned reads: tensorstore callbacks landing after orbax closed its event
    loop, or a read coroutine collected with its error unretrieved (orbax reports that error itself)."""
    text = str(exc)
    return ((isinstance(exc, RuntimeError) and 'Event loop is closed' in text)
            or text.startswith('Encountered error while reading array index'))


def quiet_checkpoint_echoes() -> None:
    """Drop the echoes of :func:`_checkpoint_echo` (harmless; the damage itself is reported in one line), which
    would otherwise print tracebacks after the error line, at random. Other errors pass through."""
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def on_unraisable(info):
        if not _checkpoint_echo(info.exc_value):
            unraisable(info)

    def on_exception(exc_type, exc, tb):
        if not _checkpoint_echo(exc):
            excepthook(exc_type, exc, tb)

    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception


def save_result(result: dict, path: str) -> str:
    """Record ``path`` as ``result['json']``, write ``result`` there as one JSON line, return that line (an eval CLI's
    last stdout line)."""
    import json
    result['json'] = path
    line = json.dumps(result)
    with open(path, 'w') as f:
        f.write(line + '\n')
    return line


def text_table(rows: Sequence[dict], columns: Sequence[str], decimals: int = 3) -> str:
    """Fixed-width text table of ``rows``' ``columns`` (floats to ``decimals`` places), header first."""
    cells = [[f'{r[c]:.{decimals}f}' if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    return '\n'.join(['  '.join(c.ljust(w) for c, w in zip(columns, widths))]
                     + ['  '.join(v.ljust(w) for v, w in zip(row, widths)) for row in cells])


def argument_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser for ``python -m <prog>`` whose usage errors end as one ``<prog>: error:`` line (exit 2)
    instead of argparse's usage dump."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:
            fail(prog, message, 2)

    return Parser(prog=f'python -m {prog}', description=description)


def json_line(result: dict, path: str | None = None) -> str:
    """``result`` as one JSON line (the last stdout line of every eval command), also written to ``path`` (its
    folder created) when given."""
    import json
    if path:
        from jaxdiff.files import write_json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, result)
    return json.dumps(result)


def run_eval(prog: str, compute: Callable[[], dict], json_path: str | None = None,
             table: Optional[Callable[[dict], str]] = None) -> dict:
    """An eval command's body: ``compute()`` -> its result; bad input (ValueError, a missing file or run, an unusable
    checkpoint) ends in one ``<prog>: error:`` line and exit 1; otherwise ``table(result)`` (if given) goes to
    stderr and the result as one JSON line (also written to ``json_path``) is the last stdout line."""
    from jaxdiff.engine.checkpoint import CheckpointError
    try:
        result = compute()
        line = json_line(result, json_path)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, CheckpointError) as e:
        fail(prog, str(e), 1)
    if table is not None:
        print(table(result), file=sys.stderr, flush=True)
    print(line, flush=True)
    return result
