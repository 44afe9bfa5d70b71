"""Transitional: :func:`stf_pipeline.kernels.window.box_sum_jax` at its former path, for
``methods/biastf.py`` until it imports it from :mod:`stf_pipeline.kernels.window`."""

from stf_pipeline.kernels.window import box_sum_jax

__all__ = ["box_sum_jax"]
