"""Training objectives: each way of training is one registered class (``objective.name``).

* ``classification``: Partial FC over a margin head, a loss on the per-sample cross-entropy, with
  difficulty scores and closeness-diversity mining (``objectives.classification``);
* ``metric``: a loss on the embeddings of PK batches, e.g. triplet (``objectives.metric``);
* ``probface``: an uncertainty module on a frozen backbone (``objectives.probface``);
* ``distillation``: the features of a teacher embedder, optionally with a margin head
  (``objectives.distillation``, its teacher's cached features in ``objectives.teacher``).

``objectives.base`` holds the contract (:class:`Objective`), the registry and the choice of ``auto``.
A new way of training subclasses :class:`Objective`, registers with ``@OBJECTIVES.register("name")`` in a
file that ``custom_imports`` names, and is chosen with ``objective.name: name``.
"""

from objectives import classification, distillation, metric, probface  # noqa: F401 - registers the objectives
from objectives.base import (
    OBJECTIVES,
    Objective,
    StepContext,
    TrainingData,
    TrainingError,
    build_objective,
    objective_class,
    objective_name,
)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "StepContext",
    "TrainingData",
    "TrainingError",
    "build_objective",
    "objective_class",
    "objective_name",
]
