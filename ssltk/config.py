"""The schema of ``params.yaml``: the single source of truth read by the CLI, DVC stages and tests.

Every section of params.yaml lives here with its defaults, ranges and enums, except the sections
of the registered tasks (``pretext.<name>``) and probes (``eval.<method>``), which their
registry entries carry (:mod:`ssltk.registry`). Backbone, task, probe and data-source names are
checked against the registries when a config is validated, so names registered after this module
was imported are accepted. Unknown keys are errors. ``load_config`` reads a file, applies dotted
``--set`` overrides and validates the result with the same schema, raising :class:`UserError`
with one line that names the file and the key. This module imports no torch and no task or
backbone code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ssltk.errors import UserError
from ssltk.registry import ARCHS, PROBES, SOURCES, TASKS, Registry, one_of
from ssltk.schema import NonNegFloat, NonNegInt, PositiveInt, Probability, Section, Seed

__all__ = [
    "Config",
    "NonNegFloat",
    "NonNegInt",
    "PositiveInt",
    "Probability",
    "Section",
    "Seed",
    "load_config",
]


def _project_root() -> Path:
    """The source checkout ssltk runs from (an editable install, also from ``dvc exp run``'s
    temporary copies); for a regular install into site-packages, the working directory.
    """
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


#: The source checkout of the code itself (its git state is recorded with each run).
PROJECT_ROOT = _project_root()


def project_of(params: Path) -> Path:
    """The project a params file belongs to: its folder, or for a ``dvc exp run --temp`` copy
    (``<project>/.dvc/tmp/exps/...``) the project it was copied from."""
    folder = params.resolve().parent
    parts = folder.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return folder


_SQLITE = "sqlite:///"


def _one_of(registry: Registry) -> AfterValidator:
    """A check that a name is registered now (not when this module was imported), so members
    registered later are accepted; the error reads as an enum's."""

    def check(name: str) -> str:
        if name not in registry.names():
            raise PydanticCustomError(
                "literal_error",
                "Input should be {expected}",
                {"expected": one_of(registry.names())},
            )
        return name

    return AfterValidator(check)


def arch_names() -> tuple[str, ...]:
    return ARCHS.names()


def task_names() -> tuple[str, ...]:
    return TASKS.names()


#: A registered backbone, pretext task, probe or data source name, checked when validated.
Arch = Annotated[str, _one_of(ARCHS)]
Task = Annotated[str, _one_of(TASKS)]
Probe = Annotated[str, _one_of(PROBES)]
Source = Annotated[str, _one_of(SOURCES)]


class DataConfig(Section):
    """Where images come from and how ``ssltk prepare`` lays them out."""

    source: Source = "demo"
    root: Path | None = Field(None, description="dataset root (not used by demo)")
    file_list: Path | None = Field(
        None,
        description="imagefolder: a text file of '<train|val|test>/<path> <label>' lines; "
        "places205: the folder of train_places205.csv and val_places205.csv",
    )
    image_size: PositiveInt = Field(
        32,
        description="side of the stored square images (arrays storage): shorter side resized to "
        "this, then centre-cropped (demo/cifar10 are 32, stl10 is 96 natively); files storage "
        "keeps the original images and only checks them at this size",
    )
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="fraction of train held out (per class, deterministically) for tuning"
    )
    pretrain_split: Literal["train", "unlabeled", "train+unlabeled"] = "train"
    prepared_dir: Path = Path("data/prepared")
    on_bad_image: Literal["fail", "skip"] = "fail"
    max_in_memory_images: PositiveInt = Field(
        200_000, description="larger sets are prepared as a manifest and decoded lazily"
    )
    workers: NonNegInt = 0


class ModelConfig(Section):
    arch: Arch = "resnet50_v1"
    widening: PositiveInt = 4
    last_relu: bool = True
    representation_size: PositiveInt | None = None
    memory_saving: bool = True
    zero_init_residual: bool = Field(
        False,
        description="start every residual branch of ResNet v1/v2 at zero (Goyal et al. 2017; not "
        "in the paper's code); revnet50 and vgg19_bn are unchanged (see ssltk/models/init.py)",
    )

    @model_validator(mode="after")
    def _last_relu_optional(self) -> ModelConfig:
        if not self.last_relu and not ARCHS.member(self.arch).last_relu_optional:
            optional = " and ".join(ARCHS.having("last_relu_optional"))
            raise ValueError(f"last_relu=false is only defined for {optional}, not {self.arch}")
        return self


class PatchGeometry(Section):
    """Jigsaw/RPL preprocessing (:mod:`ssltk.pretext.geometry`). ``None`` fields scale with
    ``pretext.input_size``."""

    resize: PositiveInt | None = None
    crop: PositiveInt | None = None
    grid: Annotated[int, Field(ge=2)] = 3
    jitter: NonNegInt | None = None
    grayscale_p: Probability = 0.66


class PretextConfig(Section):
    """``task`` and, under its name, the section of every registered task that has one (its
    class's ``config_section``), so a task registered later brings its own keys."""

    model_config = ConfigDict(extra="allow")  # only task sections; anything else is an error

    task: Task = "rotation"
    input_size: PositiveInt = Field(224, description="network input side of full-image tasks")
    preprocessing: Literal["symmetric", "tf1"] = Field(
        "symmetric",
        description="crop and resize geometry: symmetric (half-pixel resize grid, crops invariant "
        "under flips and transposes) or tf1 (the released code's TensorFlow 1 ops bit for bit; "
        "their corner-anchored resize grid lets Rotation be solved on pure noise)",
    )
    patches: PatchGeometry = PatchGeometry()

    @model_validator(mode="after")
    def _task_sections(self) -> PretextConfig:
        return _member_sections(self, TASKS)

    @model_serializer(mode="wrap")
    def _patches_last(self, handler: Any) -> dict[str, Any]:
        # The shared patch geometry after the task sections, as params files list them.
        data = handler(self)
        data["patches"] = data.pop("patches")
        return data


def _member_sections(model: Section, registry: Registry) -> Any:
    """``model`` with the sections of every member of ``registry`` that has one (its ``section``
    trait, under the member's name) validated from the extra keys; any other key is an error."""
    given = dict(model.__pydantic_extra__ or {})
    found: dict[str, Section] = {}
    for name in registry.names():
        section = registry.member(name).section
        if section is not None:
            found[name] = _validate_section(section, given.pop(name, {}), name)
    for name, value in given.items():
        raise ValidationError.from_exception_data(
            type(model).__name__, [{"type": "extra_forbidden", "loc": (name,), "input": value}]
        )
    model.__pydantic_extra__ = found
    return model


def _validate_section(section: type[Section], value: Any, name: str) -> Section:
    """``value`` validated as ``section``, its errors located under ``name``."""
    try:
        return section.model_validate(value)
    except ValidationError as err:
        errors = [{**e, "loc": (name, *e["loc"])} for e in err.errors()]
        raise ValidationError.from_exception_data(section.__name__, errors) from None


class DistributedConfig(Section):
    enabled: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_bn: bool = False
    per_replica_semantics: bool = Field(
        False, description="paper's per-core BN/triplet/permutation semantics instead of global"
    )
    nproc_per_node: PositiveInt = Field(
        1, description="processes per node: above 1, `ssltk pretrain` relaunches itself in torchrun"
    )
    nnodes: PositiveInt = Field(1, description="nodes of a multi-node run (needs rdzv_endpoint)")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (node 0)")
    rdzv_id: str = Field("ssltk", description="rendezvous id, the same on every node (a job id)")
    node_rank: NonNegInt | None = Field(
        None, description="this node's rank (e.g. $SLURM_NODEID): rank 0 runs on node 0"
    )


class PretrainConfig(Section):
    epochs: PositiveInt = 35
    task_epochs: dict[Task, PositiveInt] = Field(
        {}, description="epochs of the tasks named here, in place of epochs (see for_task)"
    )
    batch_size: PositiveInt = Field(64, description="global batch in source images")
    base_lr: Annotated[float, Field(gt=0)] = Field(0.1, description="LR per 256 images")
    schedule: Literal["step", "cosine"] = Field(
        "step", description="after warm-up: step decays (paper) or cosine to 0 over all epochs"
    )
    warmup_epochs: NonNegFloat = 5
    decay_epochs: list[NonNegFloat] = Field([15, 25], description="step schedule only")
    decay_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 1e-4
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: NonNegInt = 0
    checkpoint_every: PositiveInt = Field(500, description="steps between checkpoints")
    keep_checkpoints: PositiveInt = 2
    max_steps: PositiveInt | None = Field(None, description="stop early (smoke runs)")
    log_every: PositiveInt = 10
    distributed: DistributedConfig = DistributedConfig()

    @field_validator("decay_epochs")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if list(v) != sorted(v):
            raise ValueError(f"must be increasing, got {v}")
        return v

    def for_task(self, task: str) -> PretrainConfig:
        """These settings with ``epochs`` taken from ``task_epochs`` where it names ``task``."""
        epochs = self.task_epochs.get(task, self.epochs)
        return self if epochs == self.epochs else self.model_copy(update={"epochs": epochs})


class EvalConfig(Section):
    """Linear evaluation: which endpoints, which probe, where it is reported; and, under its
    name, the section of every registered probe that has one (``eval.lbfgs``, ``eval.sgd``, ...)."""

    model_config = ConfigDict(extra="allow")  # only probe sections; anything else is an error

    layers: list[str] = Field(
        ["pre_logits"], min_length=1, description="endpoints to probe, or [all]"
    )
    method: Probe = "lbfgs"
    pooling: Literal["max", "avg"] = "max"
    max_features: PositiveInt = 9000
    report_split: Literal["val", "test"] = "test"
    batch_size: PositiveInt = Field(256, description="images per feature-extraction batch")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path | None = Field(
        None, description="feature cache (default: <out>/features of each evaluation)"
    )
    also: list[Probe] = Field(
        [], description="more probes run on the same cached features, reported beside method"
    )
    data: DataConfig | None = Field(
        None,
        description="the prepared dataset to evaluate on, keys as in data (those not given are "
        "the run's own data.*); null: the run's own data. The pretext preprocessing is the run's",
    )
    cache_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="dtype of cached features (float16 halves disk and the probe's device copy; "
        "the probe accumulates in float32/float64 either way)",
    )
    workers: NonNegInt = Field(
        0, description="loader processes decoding images for feature extraction and SGD probes"
    )
    autocast: Literal["none", "bf16"] = Field(
        "none", description="bf16 autocast of the backbone's forward pass on CUDA (extraction)"
    )

    @model_validator(mode="after")
    def _probe_sections(self) -> EvalConfig:
        return _member_sections(self, PROBES)


class TrackingConfig(Section):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default mlflow.db beside the params file"
    )
    experiment: str = "ssltk"
    #: Where the default store and relative ``sqlite:///`` paths live (set by ``load_config``).
    _root: Path | None = PrivateAttr(None)

    @field_validator("uri")
    @classmethod
    def _store_uri(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty; leave it null for the project's SQLite store")
        if (
            v is not None
            and v.lower().startswith("sqlite:")
            and (not v.startswith(_SQLITE) or not v[len(_SQLITE) :].strip())
        ):
            raise ValueError(
                "a SQLite store is sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return v

    def project_root(self) -> Path:
        """The project of the params file the config was read from (else the working directory):
        the study's workspace."""
        return self._root or Path.cwd()

    def resolved_uri(self, root: Path | None = None) -> str:
        """The tracking URI, with relative ``sqlite:///`` paths made absolute against ``root``
        (default: the project of the params file, else the working directory)."""
        root = root or self.project_root()
        if self.uri is None:
            return f"{_SQLITE}{(root / 'mlflow.db').resolve()}"
        if self.uri.startswith(_SQLITE) and not Path(self.uri[len(_SQLITE) :]).is_absolute():
            return f"{_SQLITE}{(root / self.uri[len(_SQLITE) :]).resolve()}"
        return self.uri


class StudyConfig(Section):
    tasks: list[Task] = Field(default_factory=lambda: list(task_names()), min_length=1)
    archs: list[Arch] = Field(default_factory=lambda: list(arch_names()), min_length=1)
    widenings: list[PositiveInt] = Field([4], min_length=1)
    representation_sizes: list[PositiveInt] = Field(
        [],
        description="the width × representation-size study (paper section 3.9): cells of their "
        "own (runs/<cell>-r<size>) with model.representation_size set to each of these, beside "
        "the study's cells (which keep model.representation_size); empty: none",
    )
    transfer: dict[str, DataConfig] = Field(
        {},
        description="further datasets every cell (and its baseline) is evaluated on, by name "
        "(e.g. places205); each is prepared into its own prepared_dir",
    )


class ControlConfig(Section):
    """``ssltk control``: the configured task trained briefly on noise (see ssltk/control.py)."""

    steps: PositiveInt = Field(150, description="updates on fresh noise images")
    held_out_batches: PositiveInt = Field(
        8, description="batches of unseen noise (pretrain.batch_size images each) it is scored on"
    )
    noise_size: PositiveInt | None = Field(
        None,
        description="side the noise is drawn at before it is brought to data.image_size as "
        "ssltk prepare stores images (None: drawn at data.image_size); with noise_aspect, "
        "the originals' shorter side",
    )
    noise_aspect: Annotated[float, Field(gt=0.2, lt=5)] | None = Field(
        None,
        description="width/height of noise originals, e.g. 1.333 for 4:3 photos: each image is "
        "kept whole and cropped by the task as files storage crops a file (None: squares "
        "stored as arrays storage stores them)",
    )


class Config(Section):
    """The whole of params.yaml."""

    seed: Seed = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretext: PretextConfig = Field(default_factory=PretextConfig)
    pretrain: PretrainConfig = PretrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    study: StudyConfig = Field(default_factory=StudyConfig)
    control: ControlConfig = ControlConfig()

    @model_validator(mode="after")
    def _batch_fits_task(self) -> Config:
        task = TASKS.member(self.pretext.task)
        if self.pretrain.batch_size < task.min_batch_size:
            raise ValueError(
                f"pretrain.batch_size must be at least {task.min_batch_size} for {task.name} "
                f"({task.min_batch_reason}), got {self.pretrain.batch_size}"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of every value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------------
# Loading and overrides


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b=c'`` → ``(['a', 'b'], value)``; the value is read as YAML (``5``, ``[1, 2]``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(
            f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. pretrain.epochs=5"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _describe(error: ValidationError, origin: str) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{origin}: unknown key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) or kind == "missing" else f" (got {got!r})"
    more = len(error.errors()) - 1
    tail = f" [+{more} more]" if more else ""
    where = f"{loc}: " if loc else ""  # model-wide checks name their keys themselves
    return f"{origin}: {where}{msg}{shown}{tail}"


def config_from_dict(tree: Mapping[str, Any], origin: str = "params") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(_describe(err, origin)) from None


def read_utf8(path: Path) -> str:
    """``path``'s text, decoded strictly as UTF-8; any other encoding is a one-line user error."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int) -> None:
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML where a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = "params.yaml", overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (``None``: schema defaults only), apply ``overrides``, validate, return.

    The default tracking store is the params file's project's ``mlflow.db``.
    """
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise UserError(f"{path}: params file not found")
        try:
            loaded = yaml.load(read_utf8(path), Loader=_StrictLoader) or {}
        except _DuplicateKey as err:
            raise UserError(f"{path}: line {err.line}: duplicate key '{err.key}'") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{where} not valid YAML") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: top level must be a mapping of sections")
        tree = loaded
    overrides = list(overrides)
    if overrides:
        tree = apply_overrides(tree, overrides)
        origin = f"{origin} with --set"
    config = config_from_dict(tree, origin)
    config.tracking._root = project_of(path) if path is not None else Path.cwd()
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what runs log as an artifact)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
