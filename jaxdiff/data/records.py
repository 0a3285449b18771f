"""Record-file sources: jaxdiff's array_record format and TFDS datasets read through ``tfds.data_source``.

jaxdiff array_record format (one record per image, written by :func:`write_array_record`): a msgpack map
``{"image": <PNG bytes>, "label": <int>, "num_classes": <int>}``; PNG mode L for 1 channel, RGB for 3, RGBA for 4;
``num_classes`` is 0 (and every label 0) for unlabelled data. Files are written with ``group_size:1`` so that grain
reads any record at random. A dataset is one file, a folder of ``*.array_record`` shards (read in sorted order),
or a glob pattern.
"""
from __future__ import annotations

import glob
import io
import os
from typing import Any

import msgpack
import numpy as np

from jaxdiff.data.arrays import as_nhwc, num_classes_of


def encode_example(image: np.ndarray, label: int, num_classes: int) -> bytes:
    """uint8 (H, W, C) image + label -> one record of the jaxdiff array_record format."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
    return msgpack.packb(dict(image=buffer.getvalue(), label=int(label), num_classes=int(num_classes)))


def decode_example(record: bytes) -> dict[str, Any]:
    """One record -> dict(image=uint8 (H, W, C), label=int, num_classes=int)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    fields = msgpack.unpackb(record)
    image = np.asarray(Image.open(io.BytesIO(fields['image'])))
    return dict(image=image[..., None] if image.ndim == 2 else image, label=fields['label'],
                num_classes=fields['num_classes'])


def write_array_record(path: str, images: np.ndarray, labels: np.ndarray | None = None,
                       num_classes: int | None = None) -> None:
    """Writes uint8 images (N, H, W[, C]) and optional int labels (N,) to one array_record file at ``path``.

    ``num_classes`` defaults to max(labels) + 1 (0 without labels); pass it when a shard may miss the top class.
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    images = as_nhwc(np.asarray(images), path)
    labels = None if labels is None else np.asarray(labels, np.int64)
    num_classes = num_classes_of(labels) if num_classes is None else num_classes
    writer = ArrayRecordWriter(os.fspath(path), 'group_size:1')
    try:
        for index, image in enumerate(images):
            writer.write(encode_example(image, 0 if labels is None else labels[index], num_classes))
    finally:
        writer.close()


def array_record_paths(path: str) -> list[str]:
    """The shard files named by ``path`` (a file, a folder of *.array_record*, or a glob), sorted."""
    if os.path.isdir(path):
        paths = glob.glob(os.path.join(path, '*.array_record*'))
    else:
        paths = glob.glob(path) if path else []
    if not paths:
        raise FileNotFoundError(f'no array_record files at {path!r}; set --config.data.path to a file, a folder of '
                                '*.array_record shards or a glob (write them with jaxdiff.data.write_array_record)')
    return sorted(paths)


class ArrayRecordSource:
    """Random access to jaxdiff-format array_record shards; ``shape`` and ``num_classes`` come from record 0."""

    def __init__(self, path: str):
        import grain  # pylint: disable=import-outside-toplevel
        self.records = grain.sources.ArrayRecordDataSource(array_record_paths(path))
        if len(self.records) == 0:
            raise ValueError(f'array_record files at {path!r} hold no records')
        first = decode_example(self.records[0])
        self.shape, self.num_classes = first['image'].shape, first['num_classes']

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_example(self.records[index])


class TfdsSource:
    """A TFDS random-access data source with its ``image_key``/``label_key`` features renamed image/label."""

    def __init__(self, source: Any, image_key: str = 'image', label_key: str | None = 'label'):
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.source[index]
        image = np.asarray(item[self.image_key])
        label = 0 if self.label_key is None else item[self.label_key]
        return dict(image=image[..., None] if image.ndim == 2 else image, label=label)


def _tfds_builder(name: str, data_dir: str) -> Any:
    """A prepared TFDS builder for ``name`` in ``data_dir`` ('' = TFDS's default), or one clear ValueError."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ValueError("data.source='tfds' needs tensorflow-datasets: pip install 'jaxdiff[tfds]' "
                         '(TensorFlow is not needed to read array_record datasets)') from error
    if not name:
        raise ValueError("data.source='tfds' needs --config.data.tfds_name (e.g. 'cifar10')")
    prepare = (f'prepare it where the network is reachable with `tfds build {name} --file_format=array_record'
               f'{" --data_dir=" + data_dir if data_dir else ""}` and copy it here, or point --config.data.path at the '
               'TFDS data_dir that holds it')
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.DatasetNotFoundError as error:
        raise ValueError(f'TFDS dataset {name!r} not found in {data_dir or "the default TFDS data_dir"}; {prepare}') from error
    if not builder.is_prepared():
        raise ValueError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir}; {prepare}')
    return builder


def tfds_source(name: str, split: str, data_dir: str) -> tuple[TfdsSource, tuple[int, int, int], int]:
    """(source, native image shape (H, W, C), num_classes) of a prepared array_record TFDS dataset, read without TF."""
    builder = _tfds_builder(name, data_dir)
    if split not in builder.info.splits:
        raise ValueError(f'TFDS dataset {name!r} has no split {split!r}: use one of {sorted(builder.info.splits)}')
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError as error:
        raise ValueError(f'TFDS dataset {name!r} in {builder.data_dir} is not in a random-access format; rebuild it '
                         f'with `tfds build {name} --file_format=array_record`') from error
    features = builder.info.features
    label_key = 'label' if 'label' in features else None
    num_classes = features['label'].num_classes if label_key else 0
    wrapped = TfdsSource(source, 'image', label_key)
    if len(wrapped) == 0:
        raise ValueError(f'TFDS dataset {name!r} split {split!r} holds no examples')
    return wrapped, wrapped[0]['image'].shape, num_classes
