"""afhqv2_64_ddpmpp: EDM's unconditional AFHQv2 64x64 DDPM++ (NVlabs/edm `--cond=0 --arch=ddpmpp --batch=256
--cres=1,2,2,2 --lr=2e-4 --dropout=0.25 --augment=0.15`, duration default 200 Mimg; ~4 days on 8xV100).

Same as configs/diffusion/ffhq64_ddpmpp.py except dropout 0.25 and the data folder (EDM's afhqv2-64x64 dataset_tool output).
    python train.py --config configs/diffusion/afhqv2_64_ddpmpp.py --workdir runs/afhqv2 --config.data.path=datasets/afhqv2-64x64
"""
from jaxdiff.config import locked, sibling


def get_config():
    c = sibling(__file__, 'ffhq64_ddpmpp')
    c.data.path = 'datasets/afhqv2-64x64'  # folder of 64x64 images
    c.model.dropout = 0.25          # EDM --dropout=0.25
    return locked(c)
