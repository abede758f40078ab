"""The extension points of ssltk — pretext tasks, backbones, probes, data sources — each a
registry of named members with traits, as timm's ``@register_model``.

A member from outside registers its code and traits with a decorator (``register_task``,
``register_arch``, ``register_probe``, ``register_source``). A shipped member is declared at the
end of this module, with the module that holds its code: its name and traits are known without
importing that module (so reading params.yaml imports no torch), and the module is imported the
first time its code is asked for. This module imports nothing of ssltk but the sections.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ssltk import sections

__all__ = ["ARCHS", "PROBES", "SOURCES", "TASKS", "Member", "Registry", "one_of"]

T = TypeVar("T")


@dataclass
class Member:
    """A registered name: its traits (also readable as attributes) and its code, once loaded."""

    name: str
    traits: dict[str, Any]
    module: str | None = None
    code: Any = None

    def __getattr__(self, key: str) -> Any:
        traits = self.__dict__.get("traits", {})
        if key in traits:
            return traits[key]
        raise AttributeError(f"{self.name!r} has no trait {key!r}")


class Registry:
    """The members of one extension point, in registration order.

    ``defaults`` names every trait and its value for members that do not set it; ``key`` is what
    an unknown name is reported as (``arch``, ``pretext.task``).
    """

    def __init__(self, kind: str, key: str, **defaults: Any) -> None:
        self.kind, self.key, self.defaults = kind, key, defaults
        self._members: dict[str, Member] = {}

    def _traits(self, name: str, traits: dict[str, Any]) -> dict[str, Any]:
        unknown = set(traits) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.kind} {name!r}: unknown traits {sorted(unknown)}")
        return {**self.defaults, **traits}

    def declare(self, name: str, module: str, **traits: Any) -> None:
        """A shipped member: its traits now, its code from ``module`` (which registers it)."""
        if name in self._members:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._members[name] = Member(name, self._traits(name, traits), module)

    def register(self, name: str, **traits: Any) -> Callable[[T], T]:
        """Decorator registering ``code`` as member ``name`` with ``traits``. For a declared
        member the traits given here may add to the declared ones, never contradict them; a trait
        given at its default value counts as not given."""
        self._traits(name, traits)  # unknown traits are an error
        traits = {k: v for k, v in traits.items() if v != self.defaults[k]}

        def add(code: T) -> T:
            member = self._members.get(name)
            if member is None:
                self._members[name] = Member(name, self._traits(name, traits), code=code)
                return code
            if member.module is None or member.code is not None:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            declared = {k: v for k, v in member.traits.items() if v != self.defaults[k]}
            clash = [k for k, v in traits.items() if k in declared and declared[k] != v]
            if clash:
                raise ValueError(f"{self.kind} {name!r}: {clash} differ from the declaration")
            member.traits.update({k: v for k, v in traits.items() if k not in declared})
            member.code = code
            return code

        return add

    def unregister(self, name: str) -> None:
        """Remove member ``name`` (for code that registers one for a while, such as a test)."""
        del self._members[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    def having(self, trait: str) -> tuple[str, ...]:
        """The members whose ``trait`` is set (truthy), in registration order."""
        return tuple(name for name, m in self._members.items() if m.traits[trait])

    def member(self, name: str) -> Member:
        """Member ``name`` (its code not necessarily loaded); a ``ValueError`` listing the
        registered names otherwise."""
        if name not in self._members:
            known = ", ".join(self._members) or "(none registered)"
            raise ValueError(f"{self.key}={name!r}: expected one of {known}")
        return self._members[name]

    def load(self, name: str) -> Member:
        """Member ``name`` with its code, importing the module of a shipped member."""
        member = self.member(name)
        if member.code is None and member.module is not None:
            importlib.import_module(member.module)
        if member.code is None:
            raise RuntimeError(f"{member.module} did not register {self.kind} {name!r}")
        return member


def one_of(names: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``: the registered names as an error message lists them."""
    quoted = [repr(n) for n in names]
    return " or ".join(filter(None, [", ".join(quoted[:-1]), *quoted[-1:]]))


TASKS = Registry(
    "pretext task", "pretext.task", section=None, min_batch_size=1, min_batch_reason=""
)
ARCHS = Registry(
    "backbone",
    "arch",
    endpoints=(),
    last_relu_optional=False,
    memory_saving=False,
    input_size_rule=None,
)
#: ``needs_val``: the probe reads the val split (``True``, or a function of its section).
PROBES = Registry("probe", "eval.method", needs_val=False, section=None)
SOURCES = Registry(
    "data source", "data.source", needs_root=True, has_unlabeled=False, reads_file_list=False
)

# The shipped members, in the study's default order. ``endpoints``: a backbone's outputs, in
# forward order (what eval.layers may name; plots and the report order layers by it).
_RESNET_ENDPOINTS = ("after_root", "block1", "block2", "block3", "block4", "pre_logits", "logits")
_VGG_ENDPOINTS = ("block1", "block2", "block3", "block4", "block5", "fc6", "pre_logits", "logits")

TASKS.declare("rotation", "ssltk.pretext.rotation", section=sections.RotationConfig)
TASKS.declare(
    "exemplar",
    "ssltk.pretext.exemplar",
    section=sections.ExemplarConfig,
    min_batch_size=2,
    min_batch_reason="negatives come from other images of the batch",
)
TASKS.declare("jigsaw", "ssltk.pretext.jigsaw", section=sections.JigsawConfig)
TASKS.declare(
    "relative_patch_location",
    "ssltk.pretext.relative_patch_location",
    section=sections.RelativePatchLocationConfig,
)

ARCHS.declare("resnet50_v1", "ssltk.models.resnet", endpoints=_RESNET_ENDPOINTS)
ARCHS.declare(
    "resnet50_v2", "ssltk.models.resnet", endpoints=_RESNET_ENDPOINTS, last_relu_optional=True
)
ARCHS.declare(
    "revnet50",
    "ssltk.models.revnet",
    endpoints=_RESNET_ENDPOINTS,
    last_relu_optional=True,
    memory_saving=True,
)
ARCHS.declare("vgg19_bn", "ssltk.models.vgg", endpoints=_VGG_ENDPOINTS)

PROBES.declare(
    "lbfgs",
    "ssltk.evaluate.lbfgs_probe",
    needs_val=lambda section: len(section.l2) > 1,  # the L2 strength is chosen on val
    section=sections.LbfgsConfig,
)
PROBES.declare(
    "knn",
    "ssltk.evaluate.knn",
    needs_val=lambda section: len(section.ks) > 1,  # k is chosen on val
    section=sections.KnnProbeConfig,
)
_TRAINVAL = {"needs_val": sections.trains_on_val}
PROBES.declare("sgd", "ssltk.evaluate.sgd", section=sections.SgdProbeConfig, **_TRAINVAL)
PROBES.declare("mlp", "ssltk.evaluate.sgd", section=sections.MlpProbeConfig, **_TRAINVAL)

SOURCES.declare("demo", "ssltk.data.sources.demo", needs_root=False)
SOURCES.declare("cifar10", "ssltk.data.sources.cifar10")
SOURCES.declare("stl10", "ssltk.data.sources.stl10", has_unlabeled=True)
SOURCES.declare("imagefolder", "ssltk.data.sources.imagefolder", reads_file_list=True)
SOURCES.declare("places205", "ssltk.data.sources.places205", reads_file_list=True)
