"""Pipeline YAML -> validated config objects.

A pipeline names its operators in order (map operators first, then global ones), the
tiers kept samples are routed to (SQL predicates over sidecar columns, first match
wins), and how tier shards are cut. Every problem is reported as one ConfigError line
that names the file and the offending entry.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .paths import find_pipeline
from .ops import GlobalOp, MapOp, Operator, Resources, registry
from .rawshards import READ_COLUMNS

TIER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    cls: type[Operator]
    params: Any
    resources: Resources | None  # None for global operators
    # The options as written, before ${VAR} expansion: the recipe's identity does not
    # depend on where a model happens to live (the sidecar records the model itself).
    written: dict | None = None

    def build(self) -> Operator:
        return self.cls(self.params)

    def describe(self) -> dict:
        d = {"op": self.name, "version": self.cls.version, **dataclasses.asdict(self.params), **(self.written or {})}
        if self.resources is not None:
            d["resources"] = dataclasses.asdict(self.resources)
        return d


@dataclasses.dataclass(frozen=True)
class TierRule:
    name: str
    where: str


# balanced:t caps the samples per concept entry at about t (MetaCLIP; tiers/plan.py)
STRATEGY = re.compile(r"^(all|(first|end|random):(\d+%?)|balanced:([1-9]\d*))$")


@dataclasses.dataclass(frozen=True)
class MixEntry:
    tier: str
    strategy: str  # LLaVA-NeXT: all | first:N | end:N | random:N, N a count or a percentage; or balanced:t


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    mix: tuple[MixEntry, ...]


@dataclasses.dataclass(frozen=True)
class ShardPolicy:
    """A shard closes at max_samples samples or max_bytes of media, whichever comes first."""

    max_samples: int = 1000
    max_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    name: str
    path: str
    seed: int
    version: str | None
    map_ops: tuple[OpSpec, ...]
    global_ops: tuple[OpSpec, ...]
    tiers: tuple[TierRule, ...]
    shard: ShardPolicy
    stages: tuple[Stage, ...] = ()

    @property
    def config_hash(self) -> str:
        """Hash of everything that changes the output (not the file's path or comments)."""
        canon = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def op_versions(self) -> dict[str, str]:
        return {s.name: s.cls.version for s in (*self.map_ops, *self.global_ops)}

    def op_input_files(self) -> dict[str, str]:
        """`<index>:<op>` -> the identity of the files that operator reads beyond its
        options (Operator.input_files_identity), for the operators that read any."""
        found = {}
        for i, spec in enumerate((*self.map_ops, *self.global_ops)):
            identity = spec.cls.input_files_identity(spec.params)
            if identity is not None:
                found[f"{i}:{spec.name}"] = identity
        return found

    @property
    def declared_columns(self) -> tuple[tuple[str, str], ...]:
        """(column, JSON type) of the columns this pipeline's operators add to its
        sidecars, beyond the contract (MapOp.outputs as {column: type}); in op order."""
        seen: dict[str, str] = {}
        for spec in self.map_ops:
            for column, json_type in spec.cls.declared_columns():
                seen.setdefault(column, json_type)
        return tuple(seen.items())

    def describe(self) -> dict:
        d = {
            "name": self.name,
            "version": self.version,
            "seed": self.seed,
            "ops": [s.describe() for s in (*self.map_ops, *self.global_ops)],
            "tiers": [dataclasses.asdict(t) for t in self.tiers],
            "shard": dataclasses.asdict(self.shard),
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }
        if self.declared_columns:  # only then: the hash of every other recipe stays what it was
            d["columns"] = dict(self.declared_columns)
        return d

    @classmethod
    def from_dict(cls, doc: dict, path: str = "<python>") -> "PipelineConfig":
        """A pipeline from a mapping shaped like the YAML (name, ops, tiers, shard, stages),
        checked exactly as a YAML file is (config.parse)."""
        return parse(doc, path)


def _require_mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    odd = [k for k in value if not isinstance(k, str)]
    if odd:  # YAML 1.1 reads `on:`, `no:`, `1:` as booleans and numbers
        raise ConfigError(f"{where}: keys must be names (strings), got {_short(odd[0])}; quote it")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_op(entry: Any, where: str) -> OpSpec:
    entry = dict(_require_mapping(entry, where))
    name = entry.pop("op", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: each operator needs 'op: NAME'")
    ops = registry()
    if name not in ops:
        from .ops.base import plugin_errors

        broken = "".join(f"; plugin {p} failed to import: {e}" for p, e in plugin_errors().items())
        raise ConfigError(f"{where}: unknown operator {_short(name)}; known: {', '.join(sorted(ops))} "
                          f"(`curate ops` lists them; an operator of your own must be imported, or installed "
                          f"under the curation.ops entry point, before the pipeline is read){broken}")
    cls = ops[name]
    res_overrides = _require_mapping(entry.pop("resources", {}) or {}, f"{where}.resources")
    written = {k: v for k, v in entry.items() if isinstance(v, str) and ENV_REF.search(v)}
    expanded = {k: _expand_env(v, f"{where}.{k}") for k, v in entry.items()}
    try:
        params = cls.parse_params(expanded, where, written)
    except ConfigError as exc:  # messages quote options as written: never an environment variable's value
        raise ConfigError(_redact(str(exc), expanded, written)) from None
    if issubclass(cls, MapOp):
        return OpSpec(name, cls, params, cls.resources.with_overrides(res_overrides, where), written)
    if res_overrides:
        raise ConfigError(f"{where} ({name}): a global operator runs on the driver and takes no resources")
    return OpSpec(name, cls, params, None, written)


ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# Set while a pipeline is read only for its stages and tiers (plan, export): an unset
# ${VAR} then stays as written instead of failing, since no operator will run.
_ENV_OPTIONAL: contextvars.ContextVar[bool] = contextvars.ContextVar("env_optional", default=False)


def _expand_env(value: Any, where: str) -> Any:
    """`${NAME}` in a string option is the environment variable NAME (only that: no
    other substitution, nothing evaluated), so a recipe can point at models that live
    in different places on different machines."""
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ and _ENV_OPTIONAL.get():
            return match.group(0)
        if name not in os.environ:
            raise ConfigError(f"{where} uses ${{{name}}}, but the environment variable {name} is not set")
        return os.environ[name]

    return ENV_REF.sub(sub, value)


def _redact(message: str, expanded: dict, written: dict) -> str:
    """Put back the `${VAR}` form of every expanded option (and every variable's value)
    in an error message, so a message never prints what the environment holds."""
    swaps = [(expanded[k], w) for k, w in written.items() if isinstance(expanded.get(k), str) and expanded[k]]
    for w in written.values():
        for m in ENV_REF.finditer(w):
            value = os.environ.get(m.group(1), "")
            if len(value) >= 3:  # shorter values are no secret, and replacing them would garble the text
                swaps.append((value, m.group(0)))
    for value, shown in sorted(swaps, key=lambda s: -len(s[0])):
        message = message.replace(value, shown)
    return message


def parse(doc: Any, path: str = "<string>") -> PipelineConfig:
    doc = _require_mapping(doc, f"{path}: the top level")
    allowed = {"name", "description", "version", "seed", "ops", "tiers", "shard", "stages"}
    unknown = set(doc) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    name = doc.get("name") or Path(path).stem
    if not isinstance(name, str) or len(name) > 200 or not name.isprintable():
        raise ConfigError(f"{path}: name must be a short single-line string, got {_short(name)}")
    if not isinstance(doc.get("description", ""), str):
        raise ConfigError(f"{path}: description must be a string")
    seed = doc.get("seed", 0)
    version = doc.get("version")
    version = None if version is None else str(version)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{path}: seed must be an integer")

    ops_raw = doc.get("ops")
    if not isinstance(ops_raw, list) or not ops_raw:
        raise ConfigError(f"{path}: 'ops' must be a non-empty list of operators")
    specs = [_parse_op(e, f"{path}: ops[{i}]") for i, e in enumerate(ops_raw)]
    map_ops = [s for s in specs if issubclass(s.cls, MapOp)]
    global_ops = [s for s in specs if issubclass(s.cls, GlobalOp)]
    first_global = next((i for i, s in enumerate(specs) if issubclass(s.cls, GlobalOp)), len(specs))
    if any(issubclass(s.cls, MapOp) for s in specs[first_global:]):
        raise ConfigError(f"{path}: map operators must come before global ones ({specs[first_global].name} is global)")
    if not map_ops or map_ops[0].name != "decode_image":
        raise ConfigError(f"{path}: the first operator must be decode_image")
    _check_requirements(specs, path)

    tiers = _parse_tiers(doc.get("tiers"), path)
    names = [t.name for t in tiers]
    shard = _parse_shard(doc.get("shard", {}), path)
    declared = _check_declared(map_ops, path)

    from .tiers.routing import check_rules  # late import: routing uses TierRule from here

    produced = {c for c in READ_COLUMNS if c not in ("image_bytes", "doc_sha256")} | {"dup_of"}
    produced |= {out for spec in map_ops for out in spec.cls.outputs}
    check_rules(tuple(tiers), produced, declared)
    stages = _parse_stages(doc.get("stages") or [], set(names), path)
    return PipelineConfig(name, path, seed, version, tuple(map_ops), tuple(global_ops), tuple(tiers), shard, stages)


def _check_declared(map_ops: list[OpSpec], path: str) -> tuple[tuple[str, str], ...]:
    """The new columns the operators declare: not a name the job uses for itself, and
    one type per column across operators."""
    from . import schemas

    reserved = set(READ_COLUMNS) | set(schemas.columns("ledger")) | {"tier_rank", "shard_id", "pos"}
    props = schemas.load("sidecar")["properties"]
    for cls in registry().values():  # working columns of operators that are not sidecar columns (embeddings)
        own = dict(cls.declared_columns()) if issubclass(cls, MapOp) else {}
        reserved |= {c for c in cls.provides(None) if c not in props and c not in own}
    seen: dict[str, tuple[str, str]] = {}
    for i, spec in enumerate(map_ops):
        for column, json_type in spec.cls.declared_columns():
            if column in reserved or column.startswith("has_"):
                raise ConfigError(f"{path}: operator {spec.name} declares the column {column!r}, a name the job "
                                  "uses for itself; choose another")
            if column in seen and seen[column][1] != json_type:
                raise ConfigError(f"{path}: operator {spec.name} declares the column {column!r} as {json_type}, "
                                  f"but {seen[column][0]} declares it as {seen[column][1]}")
            seen.setdefault(column, (spec.name, json_type))
    return tuple((c, t) for c, (_, t) in seen.items())


def _parse_tiers(tiers_raw: Any, path: str) -> list[TierRule]:
    if not isinstance(tiers_raw, list) or not tiers_raw:
        raise ConfigError(f"{path}: 'tiers' must be a non-empty list of {{name, where}}")
    tiers = []
    for i, t in enumerate(tiers_raw):
        t = _require_mapping(t, f"{path}: tiers[{i}]")
        extra = set(t) - {"name", "where"}
        if extra:
            raise ConfigError(f"{path}: tiers[{i}]: unknown key(s) {sorted(extra)}")
        tname, where = t.get("name"), t.get("where", "true")
        if not isinstance(tname, str) or not TIER_NAME.match(tname):
            raise ConfigError(f"{path}: tiers[{i}]: name must match {TIER_NAME.pattern}, got {tname!r}")
        if not isinstance(where, str) or not where.strip():
            raise ConfigError(f"{path}: tiers[{i}] ({tname}): 'where' must be a SQL predicate string")
        if not _one_expression(where):
            raise ConfigError(f"{path}: tiers[{i}] ({tname}): 'where' must be one SQL expression, not statements")
        tiers.append(TierRule(tname, where.strip()))
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: tier names repeat: {names}")
    return tiers


def _parse_shard(shard: Any, path: str) -> ShardPolicy:
    shard_raw = dict(_require_mapping(shard or {}, f"{path}: shard"))
    max_samples = shard_raw.pop("max_samples", ShardPolicy.max_samples)
    max_bytes = shard_raw.pop("max_bytes", None)
    if shard_raw:
        raise ConfigError(f"{path}: shard: unknown key(s) {sorted(shard_raw)}; known: ['max_bytes', 'max_samples']")
    if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
        raise ConfigError(f"{path}: shard.max_samples must be a positive integer")
    if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
        raise ConfigError(f"{path}: shard.max_bytes must be a positive integer (bytes)")
    return ShardPolicy(max_samples, max_bytes)


# What the reader gives every sample before any operator runs. width, height and sha256
# are left out: the reader fills them for video only (from the crawl's probe); for images
# decode_image writes them, so operators that need them need decode_image.
READER_PROVIDES = frozenset(c for c in READ_COLUMNS if c not in ("width", "height", "sha256"))


def _check_requirements(specs: list[OpSpec], path: str) -> None:
    """Every column an operator needs is written by an earlier operator or the reader:
    a recipe that cannot work fails here, before any work, not at the end of stage A."""
    available = set(READER_PROVIDES)
    for i, spec in enumerate(specs):
        missing = [c for c in spec.cls.required(spec.params) if c not in available]
        if missing:
            col = missing[0]
            writers = []
            for name, cls in sorted(registry().items()):
                if col in cls.provides(None):
                    hint = getattr(cls, "provides_hint", {}).get(col)
                    writers.append(f"{name} ({hint})" if hint else name)
            fix = f"; put {' or '.join(writers)} before it" if writers else ""
            raise ConfigError(f"{path}: ops[{i}] ({spec.name}) needs the column '{col}', which no earlier "
                              f"operator writes{fix}")
        available |= set(spec.cls.provides(spec.params))


def _one_expression(where: str) -> bool:
    """False if a predicate closes its parentheses to smuggle in more statements
    (`true); CREATE ...; SELECT (1`). Syntax errors are left to routing.check_rules,
    which names them."""
    import duckdb

    try:
        statements = duckdb.extract_statements(f"SELECT 1 WHERE ({where})")
    except duckdb.Error:
        return True
    return len(statements) == 1 and statements[0].type == duckdb.StatementType.SELECT


def _parse_stages(raw: Any, tier_names: set[str], path: str) -> tuple[Stage, ...]:
    """stages: [{name, mix: [{tier, strategy}]}]: which tiers a training stage reads, and how much."""
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: 'stages' must be a list of {{name, mix}}")
    stages = []
    for i, st in enumerate(raw):
        st = _require_mapping(st, f"{path}: stages[{i}]")
        if set(st) - {"name", "mix"} or not isinstance(st.get("name"), str) or not isinstance(st.get("mix"), list) or not st["mix"]:
            raise ConfigError(f"{path}: stages[{i}] needs 'name' and a non-empty 'mix' list (and nothing else)")
        if any(s.name == st["name"] for s in stages):
            raise ConfigError(f"{path}: stages[{i}]: stage name {st['name']!r} repeats")
        mix = []
        for j, m in enumerate(st["mix"]):
            m = _require_mapping(m, f"{path}: stages[{i}].mix[{j}]")
            tier, strategy = m.get("tier"), str(m.get("strategy", "all")).replace(" ", "")
            if not isinstance(tier, str) or tier not in tier_names:
                raise ConfigError(f"{path}: stages[{i}] ({st['name']}): unknown tier {tier!r}; tiers are {sorted(tier_names)}")
            if not STRATEGY.match(strategy) or strategy.endswith("%") and int(strategy.split(":")[1][:-1]) > 100:
                raise ConfigError(f"{path}: stages[{i}] ({st['name']}): strategy {strategy!r} must be all, first:N, "
                                  "end:N or random:N (N a count or a percentage up to 100%), or balanced:t "
                                  "(t >= 1 samples per concept)")
            mix.append(MixEntry(tier, strategy))
        stages.append(Stage(st["name"], tuple(mix)))
    return tuple(stages)


PYTHON_PATH = "<python>"  # PipelineConfig.path of a pipeline built in Python


def Pipeline(name: str, ops: list, tiers: list, *, stages: list = (), seed: int = 0, version: str | None = None,
             shard: dict | ShardPolicy | None = None, description: str = "") -> PipelineConfig:
    """A pipeline built from Python objects, checked exactly as a YAML recipe is.

    ops: in order, each one of
      "name" or OpClass                         an operator with its default options
      ("name" or OpClass, {option: value})      options as in YAML (`resources` too)
      OpClass(OpClass.Params(...))              an operator instance (its params)
      {"op": "name", ...}                       the YAML form
    tiers: TierRule, {"name", "where"} or (name, where); stages: Stage or {"name", "mix"};
    shard: ShardPolicy or {"max_samples", "max_bytes"}. An operator's class must be
    registered (curation.ops.register) under its name."""
    doc: dict[str, Any] = {"name": name, "seed": seed, "ops": [_op_entry(op, i) for i, op in enumerate(ops)],
                           "tiers": [_tier_entry(t) for t in tiers], "stages": [_as_plain(st) for st in stages]}
    if version is not None:
        doc["version"] = version
    if description:
        doc["description"] = description
    if shard is not None:
        doc["shard"] = _as_plain(shard)
    return parse(doc, PYTHON_PATH)


def _op_entry(op: Any, i: int) -> Any:
    where = f"{PYTHON_PATH}: ops[{i}]"
    options: dict = {}
    if isinstance(op, tuple):
        if len(op) != 2 or not isinstance(op[1], dict):
            raise ConfigError(f"{where}: a tuple must be (operator, {{option: value}}), got {_short(op)}")
        op, options = op
    if isinstance(op, dict):
        return {**op, **options}
    if isinstance(op, Operator):  # an instance: its params, as a recipe would write them
        if options:
            raise ConfigError(f"{where}: give options either in the instance's Params or in the dict, not both")
        cls, options = type(op), _as_plain(op.params)
    elif isinstance(op, type) and issubclass(op, Operator):
        cls = op
    elif isinstance(op, str):
        return {"op": op, **options}
    else:
        raise ConfigError(f"{where}: expected an operator name, class, instance or (name, options), got {_short(op)}")
    name = getattr(cls, "name", None)
    if registry().get(name) is not cls:
        raise ConfigError(f"{where}: {cls.__qualname__} is not registered (decorate it with curation.ops.register)")
    return {"op": name, **options}


def _tier_entry(t: Any) -> Any:
    if isinstance(t, tuple) and len(t) == 2:
        return {"name": t[0], "where": t[1]}
    return _as_plain(t)


def _as_plain(value: Any) -> Any:
    """Dataclasses (Stage, MixEntry, TierRule, ShardPolicy, Params) -> the YAML shape:
    mappings, and lists for tuples; anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class RecordedPipeline(PipelineConfig):
    """A pipeline as the run that made an output recorded it (OUT/_work/run.json,
    `recipe`): name, seed, version, tiers, shard policy and stages, checked as a recipe
    is; its operators stay as they were described, not rebuilt, so reading it needs
    neither a custom operator's module nor the environment its ${VAR}s came from. Enough
    for plan and export; never for running."""

    record: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def describe(self) -> dict:
        return json.loads(json.dumps(self.record))

    @property
    def op_versions(self) -> dict[str, str]:
        return {o["op"]: o["version"] for o in self.record.get("ops", [])}

    @property
    def declared_columns(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.record.get("columns", {}).items())


def from_record(record: Any, path: str) -> RecordedPipeline:
    """A recorded recipe (PipelineConfig.describe() as JSON) -> RecordedPipeline."""
    record = _require_mapping(record, f"{path}: the recorded recipe")
    ops = record.get("ops")
    if not isinstance(ops, list) or not all(isinstance(o, dict) and isinstance(o.get("op"), str)
                                            and isinstance(o.get("version"), str) for o in ops):
        raise ConfigError(f"{path}: the recorded recipe's ops are not a list of {{op, version, ...}}")
    name, seed, version = record.get("name"), record.get("seed"), record.get("version")
    if not isinstance(name, str) or not isinstance(seed, int) or not (version is None or isinstance(version, str)):
        raise ConfigError(f"{path}: the recorded recipe needs a name, an integer seed and a version (or null)")
    tiers = _parse_tiers(record.get("tiers"), path)
    stages = _parse_stages(record.get("stages") or [], {t.name for t in tiers}, path)
    return RecordedPipeline(name, path, seed, version, (), (), tuple(tiers), _parse_shard(record.get("shard"), path),
                            stages, record=record)


def for_output(run_root: str | Path, pipeline: str | Path | None = None) -> PipelineConfig:
    """The pipeline to read a run's output with (curate plan, curate export --stage):
    `pipeline` when given (a YAML file or a bundled recipe's name); else the recipe the
    run recorded in OUT/_work/run.json, which works for pipelines built in Python and
    with operators of your own; else (outputs of older versions) the file it was loaded from."""
    from .errors import InputError

    if pipeline is not None:
        return _load_for_reading(pipeline)
    run_json = Path(run_root) / "_work" / "run.json"
    try:
        info = json.loads(run_json.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise InputError(f"name the pipeline with --pipeline ({run_json} does not say which one made this output)")
    if "recipe" in info:
        cfg = from_record(info["recipe"], f"{run_json} (recipe)")
        if cfg.config_hash != info.get("config_hash"):  # edited, or written by another version of describe()
            raise ConfigError(f"{run_json}: the recorded recipe hashes to {cfg.config_hash}, not the run's config "
                              f"{info.get('config_hash')}; name the pipeline with --pipeline")
        return cfg
    path = info.get("pipeline_path")
    if not isinstance(path, str) or not path or Path(path).name == PYTHON_PATH:
        raise InputError("name the pipeline with --pipeline (this output does not record the one that made it)")
    return _load_for_reading(path)


def _load_for_reading(path: str | Path) -> PipelineConfig:
    """A recipe loaded to read an output with, not to run: its models' ${VAR}s need not be
    set (counting tokens needs no model; the recipe's hash uses the options as written)."""
    token = _ENV_OPTIONAL.set(True)
    try:
        return load(path)
    finally:
        _ENV_OPTIONAL.reset(token)


def load(path: str | Path) -> PipelineConfig:
    """A pipeline YAML file, or the name of a bundled recipe ("demo"): see paths.find_pipeline."""
    path = find_pipeline(path)
    return parse(load_yaml(path), str(path))


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything near this is not one


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (data only, never code) that also refuses anchors and aliases,
    so a small file cannot expand into gigabytes ("billion laughs"), and refuses a key
    that repeats in one mapping (YAML would silently keep the last one)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name, <<: *name) are not "
                                              "allowed in a pipeline; write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key {_short(key)} repeats in one mapping",
                                                                key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """A recipe file's YAML: at most MAX_RECIPE_BYTES, UTF-8, data only, no aliases.
    Every problem is one ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_RECIPE_BYTES // (1 << 20)} MiB; a pipeline is a short YAML file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                          "save the pipeline as UTF-8") from None
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
