"""Every config file: in a family folder whose task it configures, loadable, every line it sets commented and
different from its schema's default (DESIGN.md: configs grouped by family, each file sets only what differs)."""
import glob
import os
import re

import pytest

from jaxdiff.config import from_file
from jaxdiff.tasks import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {'diffusion': 'denoiser', 'classifier': ('noisy_classifier', 'feature_classifier'), 'robust': 'adversarial',
            'watermark': ('watermark_codec', 'trigger')}
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*', '*.py')))


def test_every_config_sits_in_a_family_folder():
    assert len(CONFIGS) >= 17
    assert not glob.glob(os.path.join(ROOT, 'configs', '*.py')), 'a config outside the family folders'
    assert {os.path.basename(os.path.dirname(p)) for p in CONFIGS} == set(FAMILIES)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'configs')))
def test_config_loads_as_its_family_and_comments_its_fields(path):
    config = from_file(path)
    family = FAMILIES[os.path.basename(os.path.dirname(path))]
    task = config.get('task', 'denoiser')
    assert task in ((family,) if isinstance(family, str) else family)
    with open(path) as f:
        source = f.read()
    assignments = re.findall(r'^\s+c((?:\.\w+)+)\s*=.*$', source, re.M)
    lines = [line for line in source.splitlines() if re.match(r'\s+c(\.\w+)+\s*=', line)]
    assert all('#' in line for line in lines), [line for line in lines if '#' not in line]
    if 'sibling(' in source:  # derived from another config of the family: it sets what differs from that one
        return
    schema = registry.get(task).schema()
    same = [key.strip('.') for key in assignments if _get(config, key) == _get(schema, key)]
    assert not same, f'{path} sets {same} to the schema default; drop those lines'


def _get(config, dotted: str):
    for part in dotted.strip('.').split('.'):
        config = config[part]
    return tuple(config) if isinstance(config, list) else config
