"""Every config file: in a family folder whose task it configures, loadable, every line it sets commented and
different from its schema's default (DESIGN.md: configs grouped by family, each file sets only what differs)."""
import glob
import os
import re

import pytest

from jaxdiff.config import from_file
from jaxdiff import config_ranges
from jaxdiff.tasks import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {'diffusion': 'denoiser', 'classifier': ('noisy_classifier', 'feature_classifier'), 'robust': 'adversarial',
            'watermark': ('watermark_codec', 'trigger'), 'autoencoder': 'autoencoder'}
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


@pytest.mark.parametrize('name', list(registry.TASKS))
def test_every_field_declares_its_valid_values(name):
    """Each task's schema has a rule for every field (jaxdiff.config_ranges), its defaults and every config and
    tiny test config of the task satisfy them."""
    task = registry.get(name)
    assert config_ranges.undeclared(task.schema(), task.ranges) == []
    config_ranges.check(task.schema(), task.ranges)
    paths = CONFIGS + glob.glob(os.path.join(ROOT, 'tests', 'tiny', '*.py'))
    mine = [p for p in paths if from_file(p).get('task', 'denoiser') == name]
    for path in mine:
        config_ranges.check(from_file(path), task.ranges)
    assert mine or name == 'noisy_classifier'


@pytest.mark.parametrize('name, key, value, message', [
    ('denoiser', 'optim.lr', -1e-3, 'config.optim.lr=-0.001 is out of range: it must be > 0'),
    ('denoiser', 'model.sigma_data', 0.0, 'config.model.sigma_data=0.0 is out of range: it must be > 0'),
    ('denoiser', 'model.arch', 'unet', "config.model.arch='unet' is out of range: it must be one of 'ddpmpp', "),
    ('denoiser', 'model.channel_mult', (2, 0), 'must be a non-empty list of integers >= 1'),
    ('adversarial', 'generated_fraction', 1.0, 'config.generated_fraction=1.0 is out of range: it must be in [0, 1)'),
    ('watermark_codec', 'num_bits', 0, 'config.num_bits=0 is out of range: it must be an integer >= 1'),
    ('trigger', 'prior_source', 'real', "config.prior_source='real' is out of range: it must be one of 'samples'"),
    ('feature_classifier', 'classifier', 'cifar', "config.classifier='cifar' is out of range"),
])
def test_a_value_no_run_can_use_is_one_line_naming_key_value_and_range(name, key, value, message):
    config = registry.get(name).schema()
    parent, leaf = (config, key) if '.' not in key else (config[key.split('.')[0]], key.split('.')[1])
    parent[leaf] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        config_ranges.check(config, registry.get(name).ranges)
