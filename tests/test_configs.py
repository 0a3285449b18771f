"""Every config file: in a family folder whose task it configures, loadable, and every overridden line commented
(DESIGN.md: configs grouped by family; every config field a one-line comment)."""
import glob
import os
import re

import pytest

from jaxdiff.config import from_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {'diffusion': 'denoiser', 'classifier': 'noisy_classifier', 'robust': 'adversarial', 'watermark': None}
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*', '*.py')))


def test_every_config_sits_in_a_family_folder():
    assert len(CONFIGS) >= 17
    assert not glob.glob(os.path.join(ROOT, 'configs', '*.py')), 'a config outside the family folders'
    assert {os.path.basename(os.path.dirname(p)) for p in CONFIGS} == set(FAMILIES)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'configs')))
def test_config_loads_as_its_family_and_comments_its_fields(path):
    config = from_file(path)
    task = FAMILIES[os.path.basename(os.path.dirname(path))]
    if task is None:  # watermark codecs: their own schema (jaxdiff.watermark.codec_train.base_config)
        assert 'num_bits' in config
    else:
        assert config.get('task', 'denoiser') == task
    with open(path) as f:
        assignments = [line for line in f if re.match(r'\s+c(\.\w+)+\s*=', line)]
    assert all('#' in line for line in assignments), [line for line in assignments if '#' not in line]
