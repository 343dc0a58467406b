"""ProbFace (docs/methods.md §3.11, §5.6): uncertainty for a trained face-recognition backbone.

* ``probface.model``: the uncertainty module and ``ProbFaceNet`` (backbone + module, one pass);
* ``probface.loss``: the ``probface`` loss of ``train.py`` (MLS + output constraint + attention triplet);
* ``probface.embedder``: ProbFace checkpoints as embedders of (mu, sigma^2);
* ``probface.fusion``: inverse-variance template fusion, cosine and MLS scores;
* ``probface.risk``: risk-controlled verification on .bin sets (``python -m probface.risk``);
* ``probface.plot``: faces sorted by sigma^2 (``python -m probface.plot``);
* ``probface.ijb``: per-image fusion weights for ``validation_ijb.evaluate --weights``.

Training runs through ``train.py`` (``configs/recipes/probface.yaml``): the backbone of a checkpoint of
this framework is loaded and frozen, and only the uncertainty module learns.
"""
