"""The tiny default world: deterministic data generators and loaders of the shipped models.

Generators (numpy/PIL only, same seed -> same bytes):

- :mod:`studio.world.shapes`: captioned shape images (shape, colour, size, position,
  background, style).
- :mod:`studio.world.segmentation`: image/mask pairs with a domain shift, and multi-task
  scenes (activity label + per-pixel mask).
- :mod:`studio.world.multiview`: ray-cast multi-view 3D scenes with K, poses, depth and
  pointmaps; two-view pairs in the DUSt3R convention.
- :mod:`studio.world.clips`: clips made by shared camera motions; (source, styled) pairs.
- :mod:`studio.world.packaged`: data that ships in packages (scikit-learn, scikit-image).
- :mod:`studio.world.preview`: a labelled PNG grid of samples of every generator.

Models: :mod:`studio.world.pointmap_model` (two-view pointmaps, DUSt3R style; recipe in
:mod:`studio.world.pointmap_train`); shipped model loaders: :mod:`studio.world.assets`.
"""

__all__ = ["shapes", "segmentation", "multiview", "clips", "packaged", "preview", "pointmap_model"]
