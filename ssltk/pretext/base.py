"""The interface every pretext task implements, and the registry that maps names to tasks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ssltk.config import Config, Section
from ssltk.models import ArchConfig, build_backbone, weight_decay_groups
from ssltk.registry import TASKS

__all__ = [
    "PretextInputs",
    "PretextTask",
    "TaskOutput",
    "build_task",
    "register_task",
    "registered_tasks",
    "task_class",
    "unregister_task",
]

Pool = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PretextInputs:
    """One prepared batch: what the backbone sees and the pretext labels.

    ``inputs``: rotation ``[4B, 3, S, S]``, exemplar ``[copies·B, 3, S, S]``, patch tasks
    ``[B, grid², 3, p, p]``. ``labels``: one per classified example (per embedding for exemplar).
    """

    inputs: torch.Tensor
    labels: torch.Tensor


@dataclass
class TaskOutput:
    """The scalar loss and detached metrics of one step."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class PretextTask(nn.Module, ABC):
    """A backbone and its pretext head; see :func:`build_task`.

    ``__init__`` takes plain arguments; ``from_config`` reads them from a :class:`Config` (its
    ``pretext.<name>`` section is an instance of ``config_section``).
    ``prepare_batch`` turns uint8 images and their per-sample keys into network inputs and labels
    (every random decision comes from the keys), ``forward`` computes the loss and metrics,
    ``param_groups`` gives optimizer groups, ``representation`` the linear-evaluation endpoints.
    """

    name: str = ""
    #: The backbone embeds patches in patch mode rather than whole images.
    patch_mode: bool = False
    #: The loss compares examples across the batch, so data parallelism changes it unless each
    #: rank sees the whole batch (the Exemplar triplet loss).
    couples_batch: bool = False
    #: The step metric that says how well the pretext task is solved.
    metric: str = "accuracy"
    #: The model of this task's ``pretext.<name>`` section of params.yaml (None: no section).
    config_section: type[Section] | None = None
    #: The smallest global batch the loss is defined for, and why (checked on the config).
    min_batch_size: int = 1
    min_batch_reason: str = ""
    #: The paper's linear top-1 figures (ImageNet, %) of this task that were checked against a
    #: second source, as ``(arch, widening, {table: value})``; ``ssltk report`` prints them.
    paper_results: tuple[tuple[str, int, dict[str, float]], ...] = ()

    @classmethod
    def data_parallel_warning(cls, world_size: int, per_replica_semantics: bool) -> str | None:
        """What a user should know before this task's loss runs data parallel, or None."""
        if not cls.couples_batch or world_size < 2 or per_replica_semantics:
            return None
        return (
            f"{cls.name}'s loss sees each rank's share of the batch only (per-replica semantics) "
            "even though pretrain.distributed.per_replica_semantics=false"
        )

    @classmethod
    @abstractmethod
    def chance_level(cls, config: Config) -> float:
        """``metric`` of a network that has learned nothing, for ``config``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @classmethod
    @abstractmethod
    def from_config(cls, config: Config) -> PretextTask:
        """Build the task, its backbone and head from ``config``."""

    @abstractmethod
    def prepare_batch(
        self, images: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> PretextInputs:
        """uint8 ``[B, 3, H, W]`` images (or an :class:`~ssltk.data.image_list.ImageList` of
        original images of different sizes) and int64 ``[B]`` keys → inputs on their device."""

    @abstractmethod
    def forward(self, batch: PretextInputs) -> TaskOutput:
        """Loss and metrics of a prepared batch."""

    @abstractmethod
    def representation(
        self,
        images: torch.Tensor,
        layers: list[str] | None,
        *,
        pool: Pool | None = None,
        keys: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backbone endpoints ``layers`` (``None``: all) of uint8 images, preprocessed as for
        linear evaluation: centre crops, or random crops drawn from per-image ``keys`` (the SGD
        probe's training augmentation).
        """

    def head_param_groups(self) -> list[dict]:
        """Optimizer groups of the parameters outside the backbone (none by default)."""
        return []

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Backbone groups (``weight_decay`` on kernels) followed by the head's own groups."""
        groups = weight_decay_groups(self.backbone, weight_decay) + self.head_param_groups()
        return [group for group in groups if group["params"]]


def select_endpoints(
    endpoints: dict[str, torch.Tensor], layers: list[str] | None
) -> dict[str, torch.Tensor]:
    """``{layer: endpoints[layer]}`` (all of them for ``None``), naming the unknown layer and the
    available ones if one is missing.
    """
    if layers is None:
        return dict(endpoints)
    missing = [layer for layer in layers if layer not in endpoints]
    if missing:
        raise ValueError(
            f"layers: unknown endpoint {missing[0]!r}; available: {', '.join(endpoints)}"
        )
    return {layer: endpoints[layer] for layer in layers}


def backbone_from_config(
    config: Config, *, num_classes: int, patch_mode: bool, input_size: int
) -> nn.Module:
    arch = ArchConfig.from_model(
        config.model, num_classes=num_classes, patch_mode=patch_mode, input_size=input_size
    )
    return build_backbone(arch)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == labels).float().mean()


def register_task(name: str) -> Callable[[type[PretextTask]], type[PretextTask]]:
    """Class decorator adding a task to the registry under ``name``, with the traits the config
    reads (``config_section``, ``min_batch_size``, ``min_batch_reason``) taken from the class."""

    def add(cls: type[PretextTask]) -> type[PretextTask]:
        TASKS.register(
            name,
            section=cls.config_section,
            min_batch_size=cls.min_batch_size,
            min_batch_reason=cls.min_batch_reason,
        )(cls)
        cls.name = name
        return cls

    return add


def unregister_task(name: str) -> None:
    """Remove task ``name`` (for code that registers one for a while, such as a test)."""
    TASKS.unregister(name)


def registered_tasks() -> tuple[str, ...]:
    """Registered task names, in registration order."""
    return TASKS.names()


def task_class(name: str) -> type[PretextTask]:
    """The registered task class called ``name``."""
    return TASKS.load(name).code


def build_task(config: Config) -> PretextTask:
    """The pretext task named by ``config.pretext.task``, with a fresh backbone and head."""
    return task_class(config.pretext.task).from_config(config)
