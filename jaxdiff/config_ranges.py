"""Valid values of config fields, declared once per task schema and checked before any work starts.

    RANGES = dict(COMMON, **{'optim.lr': POSITIVE, 'model.arch': one_of('ddpmpp', 'ncsnpp', 'adm', 'mlp'), ...})
    check(config, RANGES)    # ValueError: config.optim.lr=-0.001 is out of range: it must be > 0

Every leaf of a task's schema has a rule (tests/test_configs.py checks it), so a value no run can use ends in one
line naming the key, the value and the valid range, instead of a run that trains on it (a negative learning rate)
or ends 'done' on non-finite steps (``model.sigma_data=0``). Rules that tie several fields together (e.g.
``loss.sigma_min < loss.sigma_max``) stay in the task's ``check``.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, NamedTuple


class Rule(NamedTuple):
    """``ok(value) -> bool`` and the valid range in words ('> 0', 'one of ...') for the message."""
    ok: Callable[[Any], bool]
    text: str


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _integer(v) -> bool:
    return _number(v) and float(v).is_integer()


def at_least(lo: float, integer: bool = False) -> Rule:
    """v >= lo (an integer when ``integer``)."""
    kind = _integer if integer else _number
    return Rule(lambda v: kind(v) and v >= lo, f'{"an integer " if integer else ""}>= {lo:g}')


def above(lo: float) -> Rule:
    """v > lo."""
    return Rule(lambda v: _number(v) and v > lo, f'> {lo:g}')


def between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Rule:
    """lo <= v <= hi, either end open."""
    def ok(v) -> bool:
        return _number(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    return Rule(ok, f'in {"(" if open_lo else "["}{lo:g}, {hi:g}{")" if open_hi else "]"}')


def one_of(*values: Any) -> Rule:
    """v is one of ``values``."""
    return Rule(lambda v: v in values, 'one of ' + ', '.join(repr(v) for v in values))


def integers(lo: int, *, nonempty: bool = True) -> Rule:
    """A tuple / list of integers >= lo (non-empty unless told)."""
    def ok(v) -> bool:
        return isinstance(v, (tuple, list)) and (len(v) > 0 or not nonempty) and all(
            _integer(x) and x >= lo for x in v)
    return Rule(ok, f'a {"non-empty " if nonempty else ""}list of integers >= {lo}')


def optional(rule: Rule) -> Rule:
    """``rule``, or None (unset)."""
    return Rule(lambda v: v is None or rule.ok(v), f'{rule.text} or None')


POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
COUNT = at_least(1, integer=True)              # a positive integer (steps, sizes)
FRACTION = between(0, 1)
BOOL = Rule(lambda v: isinstance(v, bool), 'True or False')
TEXT = Rule(lambda v: isinstance(v, str), 'a string')            # paths and names, checked where they are read
SEED = Rule(_integer, 'an integer')
NUMBER = Rule(_number, 'a number')
PROBABILITY = between(0, 1, open_hi=True)     # dropout-like: 1 would drop everything

# The fields every task's schema shares (the engine's and the data sources').
COMMON: dict[str, Rule] = {
    'seed': SEED, 'batch_size': COUNT, 'total_steps': at_least(0, integer=True), 'checkpoint_every': COUNT,
    'keep_checkpoints': COUNT, 'log_every': COUNT, 'parallel.fsdp': COUNT, 'optim.lr': POSITIVE,
}
DATA: dict[str, Rule] = {
    'data.source': one_of('digits', 'fashion_mnist', 'npz', 'folder', 'array_record', 'tfds'),
    'data.path': TEXT, 'data.tfds_name': TEXT, 'data.split': TEXT, 'data.resolution': at_least(0, integer=True),
    'data.max_size': at_least(0, integer=True),
}


def leaves(config, prefix: str = '') -> dict[str, Any]:
    """{'optim.lr': 0.001, ...}: the dotted key and value of every leaf of a ConfigDict or nested dict."""
    out = {}
    for key, value in config.items():
        name = f'{prefix}.{key}' if prefix else key
        out.update(leaves(value, name) if hasattr(value, 'items') else {name: value})
    return out


def check(config, ranges: Mapping[str, Rule]) -> None:
    """ValueError (one line: key, value, valid range) for the first field of ``config`` outside its rule."""
    values = leaves(config)
    for key, rule in ranges.items():
        if key in values and not rule.ok(values[key]):
            raise ValueError(f'config.{key}={values[key]!r} is out of range: it must be {rule.text}')


def undeclared(schema, ranges: Mapping[str, Rule]) -> list[str]:
    """The leaves of ``schema`` without a rule in ``ranges`` (a test keeps this empty for every task)."""
    return sorted(set(leaves(schema)) - set(ranges))
