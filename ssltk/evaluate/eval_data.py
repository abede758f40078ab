"""Which prepared dataset an evaluation reads, and the key its figures are filed under.

``eval.data`` names the evaluation dataset with the keys of ``data``; those it does not give are
the run's own ``data.*`` (``eval.data: null``: the run's own data). The pretext preprocessing
always comes from the run. Figures of a dataset other than the one the run was pretrained on are
keyed by that dataset, ``data-<first 16 hex digits of its content hash>`` (:func:`dataset_key`):
in metric and tag names (:func:`ssltk.tracking.probe_metric`), in the default output folder and
in a shared feature cache, so figures of two datasets never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssltk.config import Config, DataConfig
from ssltk.data.dataset import PreparedDataset
from ssltk.data.errors import PreparedDataError

__all__ = ["EvalData", "dataset_key", "eval_data_config", "open_eval_data"]

KEY_PREFIX = "data-"
_KEY_DIGITS = 16


def dataset_key(content_hash: str) -> str:
    """``data-<hash16>``: how figures on a prepared dataset other than the run's own are filed."""
    return f"{KEY_PREFIX}{content_hash[:_KEY_DIGITS]}"


def eval_data_config(config: Config) -> DataConfig:
    """``config.data`` overlaid with the keys ``eval.data`` gives (all of it if null)."""
    given = config.eval.data
    if given is None:
        return config.data
    return config.data.model_copy(
        update={name: getattr(given, name) for name in given.model_fields_set}
    )


@dataclass(frozen=True)
class EvalData:
    """The evaluation dataset, checked against the settings it was prepared from."""

    #: The run's config with ``data`` replaced by the evaluation data's settings.
    config: Config
    dataset: PreparedDataset
    #: None when it is the data the run was pretrained on (or, for a baseline, the study's data).
    key: str | None

    @property
    def content_hash(self) -> str:
        return self.dataset.content_hash

    def describe(self) -> dict[str, str | int | None]:
        """What the dataset is, for records and report headings."""
        data = self.config.data
        return {
            "source": data.source,
            "root": None if data.root is None else str(data.root),
            "file_list": None if data.file_list is None else str(data.file_list),
            "prepared_dir": str(data.prepared_dir),
            "image_size": data.image_size,
            "content_hash": self.content_hash,
        }


def _own_hash(config: Config) -> str | None:
    """The content hash of the prepared data ``config.data`` names, if it can be read."""
    try:
        return PreparedDataset.open(config.data.prepared_dir).content_hash
    except PreparedDataError:
        return None


def open_eval_data(config: Config, own_hash: str | None = None) -> EvalData:
    """The evaluation dataset of ``config`` (see the module); ``own_hash`` is the content hash of
    the run's pretraining data (None for a baseline: the prepared ``data.prepared_dir``, if any).
    Raises :class:`PreparedDataError` (one line naming the key) if it is missing or was prepared
    from other settings."""
    data = eval_data_config(config)
    settings = config.model_copy(update={"data": data})
    section = "data" if config.eval.data is None else "eval.data"
    dataset = PreparedDataset.open(Path(data.prepared_dir))
    try:
        dataset.check_settings(settings, section=section)
    except PreparedDataError as err:
        if config.eval.data is not None:
            raise
        raise PreparedDataError(
            f"{err}; to evaluate on another prepared dataset give its settings as eval.data.* "
            "(e.g. --set eval.data.source=imagefolder --set eval.data.prepared_dir=...)"
        ) from None
    if config.eval.data is None:
        return EvalData(settings, dataset, None)
    own = own_hash if own_hash is not None else _own_hash(config)
    key = None if dataset.content_hash == own else dataset_key(dataset.content_hash)
    return EvalData(settings, dataset, key)
