"""Pretext tasks of the paper: Rotation, Exemplar, Jigsaw and Relative Patch Location.

``build_task(config)`` returns the :class:`PretextTask` named by ``config.pretext.task``. Each task
lives in its own module, registers itself with :func:`register_task` and carries its traits and its
``pretext.<name>`` config section; a new task is one more such module, imported before the config
is read. The shipped tasks are declared in :mod:`ssltk.registry` and imported when first asked for.
"""

from ssltk.pretext.base import (
    PretextInputs,
    PretextTask,
    TaskOutput,
    build_task,
    register_task,
    registered_tasks,
    task_class,
    unregister_task,
)
from ssltk.pretext.geometry import PatchLayout, resolve_patch_layout
from ssltk.pretext.permutations import load_permutations
from ssltk.pretext.triplet import semihard_triplet_loss

__all__ = [
    "PatchLayout",
    "PretextInputs",
    "PretextTask",
    "TaskOutput",
    "build_task",
    "load_permutations",
    "register_task",
    "registered_tasks",
    "resolve_patch_layout",
    "semihard_triplet_loss",
    "task_class",
    "unregister_task",
]
