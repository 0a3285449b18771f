"""afhqv2_64_ddpmpp: EDM's unconditional AFHQv2 64x64 DDPM++ (NVlabs/edm `--cond=0 --arch=ddpmpp --batch=256
--cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15`, duration default 200 Mimg; ~4 days on 8xV100).

Same as configs/ffhq64_ddpmpp.py except dropout 0.25 and the data folder (EDM's afhqv2-64x64 dataset_tool output).
    python train.py --config configs/afhqv2_64_ddpmpp.py --workdir runs/afhqv2 --config.data.path=datasets/afhqv2-64x64
"""
import importlib.util
import os

from jaxdiff.config import locked


def _base():
    """configs/ffhq64_ddpmpp.py, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ffhq64_ddpmpp.py')
    spec = importlib.util.spec_from_file_location('_base_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    c = _base().get_config()
    c.unlock()
    c.data.path = 'datasets/afhqv2-64x64'  # folder of 64x64 images
    c.model.dropout = 0.25          # EDM --dropout=0.25
    return locked(c)
