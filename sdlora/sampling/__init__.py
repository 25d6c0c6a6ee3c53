"""Rendering: the sampler (hires and tiled passes), grids, infotext, style metrics, plots."""
