"""The file diffusers loads for ``custom_pipeline=<path to this file>``.

diffusers copies this file into its module cache and picks the one DiffusionPipeline
subclass defined outside diffusers that it finds here, so it only re-exports the
plug-in class (the studio package must be installed).
"""

from studio.plugin import StudioStableDiffusionPipeline

__all__ = ["StudioStableDiffusionPipeline"]
