"""imagenet64_adm: EDM's class-conditional ImageNet 64x64 ADM (NVlabs/edm `--cond=1 --arch=adm --duration=2500
--batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 --augment=0 --fp16=1 --ls=100`; ~13 days on 32xA100).

fp16 with loss scaling becomes bfloat16 compute with float32 params (no loss scaling needed). Large: shard params
and optimizer state with --config.parallel.fsdp=N on big meshes. Data: EDM dataset_tool output (center-crop,
64x64), unzipped into a folder.
    python train.py --config configs/diffusion/imagenet64_adm.py --workdir runs/imagenet64 --config.data.path=datasets/imagenet-64x64
"""
from jaxdiff.config import base_config, locked

MIMG = 1_000_000


def get_config():
    c = base_config()
    c.batch_size = 4096             # EDM --batch=4096
    c.total_steps = -(-2500 * MIMG // 4096)  # EDM --duration=2500 (Mimg) = 610,352 steps
    c.checkpoint_every = 2_500      # ~10 Mimg between checkpoints

    c.data.source = 'folder'        # EDM dataset_tool output, unzipped (with dataset.json labels)
    c.data.path = 'datasets/imagenet-64x64'  # folder of 64x64 images
    c.data.resolution = 64          # 64x64

    c.model.arch = 'adm'            # EDM --arch=adm (DhariwalUNet)
    c.model.model_channels = 192    # ADM width
    c.model.channel_mult = (1, 2, 3, 4)  # ADM levels 64, 32, 16, 8
    c.model.num_blocks = 3          # ADM blocks per level
    c.model.attn_resolutions = (32, 16, 8)  # ADM attention levels
    c.model.dropout = 0.10          # EDM --dropout=0.10
    c.model.dtype = 'bfloat16'      # EDM --fp16=1 -> bfloat16 compute, float32 params

    c.loss.augment_p = 0.0          # EDM --augment=0

    c.optim.lr = 1e-4               # EDM --lr=1e-4 (README training table)

    c.ema.halflife_img = 50 * MIMG  # EDM --ema=50 (Mimg)
    return locked(c)
