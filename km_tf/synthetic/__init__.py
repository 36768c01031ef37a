"""Offline image generators with many classes, for pretraining and meta-learning.

- `glyphs`: one class per letter of the fonts that ship inside matplotlib
  (DejaVu, STIX, Computer Modern), grouped by Unicode script, each instance
  drawn in a random covering font with a random affine distortion, stroke
  width, contrast and noise (Omniglot-like).
- `fractals`: one class per random iterated function system
  (FractalDB-style, Kataoka et al., ACCV 2020), instances by perturbing the
  system's parameters and the rendering.

Both are deterministic from a seed and cached on disk (`cache`); they
are read through `km_tf.data.load("glyphs:...")` / `load("fractals:...")`.
"""
