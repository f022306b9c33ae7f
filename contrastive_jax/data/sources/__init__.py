"""Example sources by kind, each in its own module; every one returns a ``records`` source.

* ``mnist.py``: the embedded default, 5,000 real MNIST digits with class-name captions.
* ``files.py``: image folders (``<class>/<image>``), CSV image-text pairs (open_clip's
  layout), and Karpathy-split caption files (Flickr30k / COCO retrieval, evaluation only).
* ``tfrecord.py``: image-text TFRecord shards: the writer, the record-count index, and the
  in-memory and streaming readers.
* ``tfds.py``: tfds data sets by name: in memory, as this process's TFRecord files
  (seekable), or as this process's even sub-split (replayed on resume).

Random-access sources are ``records.IndexedSource`` (numpy columns in host memory); streams
are ``records.StreamSource`` (this process's part, split across hosts by
``streaming.assign_files``). ``pipeline.py`` picks the source from ``config.data``; adding a
kind is a module here and a case in ``pipeline.indexed_source`` (or the streaming readers).
"""

from contrastive_jax.data.sources.files import (IMAGE_EXTENSIONS, KARPATHY_SPLITS, csv_source,
                                                folder_source, karpathy_json_source)
from contrastive_jax.data.sources.mnist import (MNIST_CLASS_NAMES, MNIST_EVAL_TEMPLATES,
                                                MNIST_TRAIN_TEMPLATES, mnist_source)
from contrastive_jax.data.sources.tfds import (tfds_builder, tfds_file_stream, tfds_source,
                                               tfds_stream)
from contrastive_jax.data.sources.tfrecord import (
    INDEX_FORMAT, INDEX_SUFFIX, damaged_tfrecord_files, index_tfrecords, read_tfrecord_index,
    tfrecord_counts, tfrecord_files, tfrecord_source, tfrecord_stream,
    write_image_text_tfrecords, write_tfrecord_index)

__all__ = [
    "IMAGE_EXTENSIONS", "INDEX_FORMAT", "INDEX_SUFFIX", "KARPATHY_SPLITS", "MNIST_CLASS_NAMES",
    "MNIST_EVAL_TEMPLATES", "MNIST_TRAIN_TEMPLATES", "csv_source", "damaged_tfrecord_files",
    "folder_source", "index_tfrecords", "karpathy_json_source", "mnist_source",
    "read_tfrecord_index", "tfds_builder", "tfds_file_stream", "tfds_source", "tfds_stream",
    "tfrecord_counts", "tfrecord_files", "tfrecord_source", "tfrecord_stream",
    "write_image_text_tfrecords", "write_tfrecord_index",
]
