"""Continual learning with a pretrained backbone and deltas: a task stream, strategies (SimpleCIL, APER, replay,
one adapter per task, ...), the accuracy-matrix metrics, and a runner that saves after every task and resumes."""

from .learner import ClassifierModel, Learner, class_means, cosine_predict
from .metrics import AccuracyMatrix
from .run import evaluate, run_stream
from .strategies import STRATEGIES, Strategy, make_strategy, register
from .stream import SETTINGS, EvalSet, Task, TaskStream

__all__ = ["STRATEGIES", "SETTINGS", "AccuracyMatrix", "ClassifierModel", "EvalSet", "Learner", "Strategy", "Task",
           "TaskStream", "class_means", "cosine_predict", "evaluate", "make_strategy", "register", "run_stream"]
