"""Numerics shared by several methods: window sums and drivers, a thread pool, least squares,
classification, thin-plate splines, scene statistics, Pallas helpers.

Nothing here imports a method (:mod:`stf_pipeline.methods`); methods import from here.
"""
