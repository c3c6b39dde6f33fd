"""The benchmark harness, not needed to use the library.

Samplers for the shipped digits models (`sampling`), download-free image-quality
metrics (`metrics`), other projects' caches set up as baselines (`peers`) and the
speed/quality benchmark behind `python -m tocache_fx bench` (`bench`).
"""
