"""The evaluation layer between ``data/`` and the benchmark folders (``validation_*/``).

* ``evaluation.embedders``: embedders from files (a checkpoint of this framework, insightface or AdaFace
  weights, an ONNX model): uint8 RGB batches -> features, each feeding its network what it was trained on;
* ``evaluation.extract``: batched extraction of features (and of the horizontal flips) from image arrays,
  datasets and image files;
* ``evaluation.cache``: the feature cache every evaluator uses (features saved once per model and image set);
* ``evaluation.verification``: flip fusion, the 10-fold protocol of pair lists, ROC and TAR@FAR;
* ``evaluation.identification``: closed-set ranks and CMC, TPIR at FPIR;
* ``evaluation.options``: the command-line options the evaluators share and the settings they report.

The ``validation_*`` folders hold only their protocol (file layouts, pair and template lists, the benchmark's
rules) and their command line; they import this package, never each other.
"""
