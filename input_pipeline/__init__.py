"""Input pipeline: tensorflow-datasets sources, the papers' augmentations and test-time views.

- ``sources``: ``load_source(dataset, split, data_dir)`` for a tfds name, a folder of class
  sub-folders, or the embedded default ``flaxnets_digits``.
- ``augment``: the single operations; ``recipes``: one named training recipe per paper.
- ``views``: centre, 10-crop, GoogLeNet's 144 crops and VGG's dense multi-scale views.
- ``pipeline``: ``make_dataset`` (per-process tf.data) and ``global_batches`` (sharded jax.Arrays).
"""
