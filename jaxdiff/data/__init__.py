"""Data: image sources, the grain input pipeline and EDM's non-leaky augmentation.

    source, info = make_source(config.data)                     # dict(image=uint8 (H, W, C), label=int32 ())
    it, info = make_iterator(config.data, global_batch_size=512, seed=0, process_index=0, process_count=1)
    images, augment_labels = augment_pipe(key, batch['image'], p=0.12)   # (B, H, W, C), (B, 9)
"""
from jaxdiff.data.augment import AUGMENT_DIM, AUGMENT_LABELS, EDM_PROBABILITIES, augment_pipe, resample
from jaxdiff.data.pipeline import make_iterator
from jaxdiff.data.records import write_array_record
from jaxdiff.data.sources import DatasetInfo, make_source

__all__ = ['AUGMENT_DIM', 'AUGMENT_LABELS', 'EDM_PROBABILITIES', 'DatasetInfo', 'augment_pipe', 'make_iterator',
           'make_source', 'resample', 'write_array_record']
