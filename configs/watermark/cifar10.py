"""watermark/cifar10: the paper's CIFAR-10 codec (Zhao et al. 2023): 64 bits, batch 64, Adam 1e-4, l2 weight 0
until bit accuracy > 0.9, then 1000 steps wait and a 3000-step ramp to 10; 100 epochs of the 50k training set.
Reads CIFAR-10 through TFDS (prepared offline; nothing downloads at run time) or any 32x32 RGB source:
    python train.py --config configs/watermark/cifar10.py --workdir runs/wm_cifar10
"""
from jaxdiff.tasks.watermark_codec import codec_config, locked


def get_config():
    c = codec_config()              # every field with its comment (task watermark_codec)
    c.total_steps = 78_200          # optimizer steps (100 epochs of 782 steps, the paper's run)

    c.data.source = 'tfds'          # TFDS array_record data source (prepare cifar10 offline first)
    c.data.tfds_name = 'cifar10'    # TFDS dataset name
    return locked(c)
