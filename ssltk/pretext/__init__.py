"""Pretext tasks of the paper (§2): Rotation, Exemplar, Jigsaw and Relative Patch Location.

``build_task(config)`` returns the :class:`PretextTask` named by ``config.pretext.task``. Each task
lives in its own module and registers itself with :func:`register_task`; a new task is one more
module imported here, and its name added to ``ssltk.config.TASKS``.
"""

from ssltk.config import TASKS  # the schema's enum of task names, one source of truth
from ssltk.pretext import exemplar, jigsaw, relative_patch_location, rotation
from ssltk.pretext.base import (
    PretextInputs,
    PretextTask,
    TaskOutput,
    build_task,
    register_task,
    registered_tasks,
    task_class,
)
from ssltk.pretext.geometry import PatchLayout, resolve_patch_layout
from ssltk.pretext.permutations import load_permutations
from ssltk.pretext.triplet import semihard_triplet_loss

__all__ = [
    "TASKS",
    "PatchLayout",
    "PretextInputs",
    "PretextTask",
    "TaskOutput",
    "build_task",
    "exemplar",
    "jigsaw",
    "load_permutations",
    "register_task",
    "registered_tasks",
    "relative_patch_location",
    "resolve_patch_layout",
    "rotation",
    "semihard_triplet_loss",
    "task_class",
]
