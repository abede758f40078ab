"""The pydantic parts every section of params.yaml is built from: :class:`Section` and the field
types. Nothing else of ssltk is imported here, so a task, a probe or a data source can define its
own section without importing the config."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NonNegFloat", "NonNegInt", "PositiveInt", "Probability", "Section", "Seed"]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
#: Seeds key 64-bit counter-based streams and torch's generator (``seed + rank``): signed 64 bits.
Seed = Annotated[int, Field(ge=0, lt=2**63)]


class Section(BaseModel):
    """A section of params.yaml: unknown keys are errors, assignments are validated."""

    # No .inf/.nan anywhere: every float of the schema is a rate, a size or a probability.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )
