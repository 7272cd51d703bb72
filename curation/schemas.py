"""The data contracts in curation/contracts/*.schema.json (linked from the repository's
schemas/), and validation of what the code writes.

JSON Schema is the language-neutral contract; the Arrow schema of each parquet file is
derived from it so column names and types cannot drift from the documented contract:
arrays are Arrow lists, objects with `properties` structs, objects with only
`additionalProperties` maps, a string with `contentMediaType: application/json`
Arrow's JSON extension type, a `date-time` string a UTC timestamp and an `int32` integer
an int32 (`_arrow_type`). In Python a row holds them as lists, dicts, (JSON) text and
ISO text; `py_value` turns what Arrow or pandas hand back into that.

A run may add columns to its sidecars: an operator declares them with their types
(`outputs = {"my_score": "float"}`, see curation/ops/base.py), and the run passes the
declarations (`declared`) to the functions here, which merge them into that run's
sidecar contract. The built-in columns and their types are the same in every run.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import re
from typing import Any, Iterable

import math

import fastjsonschema
import jsonschema
import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import ConfigError, CurationError
from .paths import CONTRACTS_DIR

_ARROW_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


class SchemaViolation(CurationError):
    """The code was about to write a row that breaks a data contract."""


# A run's declared columns: (column, JSON type) pairs that its operators add to the
# sidecar (MapOp.outputs given as {column: type}; PipelineConfig.declared_columns).
# Always a tuple, so that every function below can cache on it.
Declared = tuple[tuple[str, str], ...]

# What an operator may write as a column's type, and the JSON Schema type it becomes.
COLUMN_TYPES = {"float": "number", "number": "number", "int": "integer", "integer": "integer",
                "str": "string", "string": "string", "bool": "boolean", "boolean": "boolean"}
_PYTHON_TYPES = {float: "number", int: "integer", str: "string", bool: "boolean"}
COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def column_type(spec: Any) -> str | None:
    """The JSON type for a declared column type ("float", "int", "str", "bool", their
    JSON Schema names, or the Python types themselves); None if it is none of those."""
    if isinstance(spec, type):
        return _PYTHON_TYPES.get(spec)
    return COLUMN_TYPES.get(spec) if isinstance(spec, str) else None


def contract_type(prop: dict) -> str:
    """The JSON type a contract column holds when it is not null."""
    if "const" in prop or "enum" in prop:
        return "string"
    types = prop.get("type", "string")
    types = types if isinstance(types, list) else [types]
    return next((t for t in types if t != "null"), "string")


def check_declared(outputs: dict, where: str) -> Declared:
    """Check an operator's {column: type} declaration against the sidecar contract and
    return its new columns as (column, JSON type). A contract column may be named only
    with the type the contract gives it: the built-in columns never change."""
    props = load("sidecar")["properties"]
    new = []
    for column, spec in outputs.items():
        json_type = column_type(spec)
        if not isinstance(column, str) or not COLUMN_NAME.match(column):
            raise ConfigError(f"{where}: column name {column!r} must be lowercase letters, digits and _ "
                              "(starting with a letter, at most 63 characters)")
        if json_type is None:
            raise ConfigError(f"{where}: column {column!r} has type {spec!r}; use one of "
                              f"{sorted(set(COLUMN_TYPES) - set(COLUMN_TYPES.values()))} (or float, int, str, bool)")
        if column in props:
            if contract_type(props[column]) != json_type:
                raise ConfigError(f"{where}: column {column!r} is a built-in sidecar column of type "
                                  f"{contract_type(props[column])}, not {json_type}; name a new column instead")
            continue
        new.append((column, json_type))
    return tuple(new)


@functools.lru_cache(maxsize=None)
def load(name: str, declared: Declared = ()) -> dict:
    """The JSON Schema called `name` ("sidecar", "ledger", "manifest"); for "sidecar",
    with a run's declared columns added (nullable: a column stays null on the rows its
    operator does not reach). The result is shared: do not modify it."""
    if declared:
        if name != "sidecar":
            raise ValueError(f"only the sidecar contract takes declared columns, not {name!r}")
        schema = copy.deepcopy(load(name))
        props = schema["properties"]
        for column, json_type in declared:
            if column in props:
                raise ValueError(f"declared column {column!r} is a built-in sidecar column")
            props[column] = {"type": [json_type, "null"], "description": "declared by an operator of this run"}
        return schema
    with open(CONTRACTS_DIR / f"{name}.schema.json", encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _validator(name: str, declared: Declared = ()) -> jsonschema.protocols.Validator:
    schema = load(name, declared)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@functools.lru_cache(maxsize=None)
def _fast_check(name: str, declared: Declared = ()):
    """Compiled validator (~25x faster than jsonschema): every written row is checked."""
    return fastjsonschema.compile(load(name, declared))


def columns(name: str, declared: Declared = ()) -> list[str]:
    return list(load(name, declared)["properties"])


JSON_MEDIA_TYPE = "application/json"


def _arrow_type(prop: dict) -> pa.DataType:
    """The Arrow type of a contract property: scalars by their JSON type; an array by its
    `items` (list); an object with `properties` is a struct (fields in contract order),
    one with only `additionalProperties` a map from string; a string whose
    contentMediaType is JSON uses Arrow's JSON extension type (Parquet's JSON logical
    type, which DuckDB reads as JSON)."""
    if "const" in prop or "enum" in prop:
        return pa.string()
    types = prop.get("type", "string")
    types = types if isinstance(types, list) else [types]
    concrete = next((t for t in types if t != "null"), "string")
    if concrete == "array":
        return pa.list_(_arrow_type(prop["items"]))
    if concrete == "object":
        if "properties" in prop:
            return pa.struct([pa.field(k, _arrow_type(v)) for k, v in prop["properties"].items()])
        return pa.map_(pa.string(), _arrow_type(prop["additionalProperties"]))
    if concrete == "string" and prop.get("contentMediaType") == JSON_MEDIA_TYPE:
        return pa.json_(pa.string())
    if concrete == "string" and prop.get("format") == "date-time":
        return pa.timestamp("us", tz="UTC")
    if concrete == "integer" and prop.get("format") == "int32":
        return pa.int32()
    return _ARROW_TYPES[concrete]


def py_value(value: Any, arrow_type: pa.DataType) -> Any:
    """A value of a column of `arrow_type` as the plain Python value the contract
    describes, whichever way it was read: Arrow's to_pylist (maps as (key, value)
    pairs), pandas (lists as numpy arrays, NaN for null) or already plain. Lists become
    lists, structs and maps dicts, scalars as plain_value gives them."""
    value = plain_value(value)
    if value is None:
        return None
    if isinstance(arrow_type, pa.ExtensionType):
        arrow_type = arrow_type.storage_type
    # A value of the wrong shape (JSON text where a map or list belongs, from an old
    # writer or a user's operator) is returned as is: validation names the column.
    if pa.types.is_map(arrow_type):
        if isinstance(value, dict):
            pairs = value.items()
        elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            pairs = value
        else:
            return value
        return {k: py_value(v, arrow_type.item_type) for k, v in pairs}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        if isinstance(value, (str, bytes, dict)):
            return value
        return [py_value(v, arrow_type.value_type) for v in value]
    if pa.types.is_struct(arrow_type) and isinstance(value, dict):
        return {f.name: py_value(value.get(f.name), f.type) for f in arrow_type}
    if pa.types.is_integer(arrow_type) and isinstance(value, float) and value.is_integer():
        return int(value)  # pandas holds an integer column with nulls as floats
    if pa.types.is_timestamp(arrow_type) and isinstance(value, datetime.datetime):
        return value.astimezone(datetime.timezone.utc).isoformat()  # the contract's date-time string
    return value


def _arrow_value(value: Any, arrow_type: pa.DataType) -> Any:
    """A validated plain value as pyarrow takes it for `arrow_type` (date-time text ->
    datetime, also inside lists and structs; everything else as is)."""
    if pa.types.is_timestamp(arrow_type) and isinstance(value, str):
        return datetime.datetime.fromisoformat(value)
    if pa.types.is_list(arrow_type) and isinstance(value, list):
        return [_arrow_value(v, arrow_type.value_type) for v in value]
    if pa.types.is_struct(arrow_type) and isinstance(value, dict):
        return {**value, **{f.name: _arrow_value(value.get(f.name), f.type) for f in arrow_type}}
    return value


def _has_timestamp(arrow_type: pa.DataType) -> bool:
    if pa.types.is_timestamp(arrow_type):
        return True
    if pa.types.is_list(arrow_type):
        return _has_timestamp(arrow_type.value_type)
    return pa.types.is_struct(arrow_type) and any(_has_timestamp(f.type) for f in arrow_type)


def typed_columns(name: str, declared: Declared = ()) -> dict[str, pa.DataType]:
    """Contract `name`'s columns whose values are lists, structs or maps, with their types."""
    return {f.name: f.type for f in arrow_schema(name, declared) if pa.types.is_nested(f.type)}


def plain_columns(frame: pd.DataFrame, name: str = "sidecar", declared: Declared = ()) -> pd.DataFrame:
    """`frame` (a pandas batch read from Arrow) with its nested contract columns as plain
    Python lists and dicts, so operators read them as what the contract says (in place)."""
    for col, arrow_type in typed_columns(name, declared).items():
        if col in frame.columns:
            frame[col] = pd.Series([py_value(v, arrow_type) for v in frame[col]], index=frame.index, dtype=object)
    return frame


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of an Arrow table as plain Python values (maps as dicts)."""
    return table.to_pylist(maps_as_pydicts="strict")


@functools.lru_cache(maxsize=None)
def arrow_schema(name: str, declared: Declared = ()) -> pa.Schema:
    """Arrow schema with the contract's columns, in the contract's order (then the
    declared columns, in their order)."""
    props = load(name, declared)["properties"]
    return pa.schema([pa.field(col, _arrow_type(p)) for col, p in props.items()])


def validate_rows(name: str, rows: Iterable[dict[str, Any]], declared: Declared = ()) -> None:
    """Raise SchemaViolation naming the first row (by uid) that breaks contract `name`
    (with the run's `declared` columns)."""
    fast = _fast_check(name, declared)
    for row in rows:
        try:
            fast(row)
            continue
        except fastjsonschema.JsonSchemaException as exc:
            message, where = exc.message, "(row)"
        # jsonschema words the error better: use it only for the row that failed.
        err = jsonschema.exceptions.best_match(_validator(name, declared).iter_errors(row))
        if err is not None:
            message, where = err.message, "/".join(str(p) for p in err.absolute_path) or "(row)"
        extended = f" (+ declared columns {[c for c, _ in declared]})" if declared else ""
        raise SchemaViolation(f"{name} row uid={row.get('uid', '?')} breaks contract curation/contracts/{name}.schema.json"
                              f"{extended} at {where}: {message}")


def validate_document(name: str, doc: dict) -> None:
    validate_rows(name, [doc])


def plain_value(value: Any) -> Any:
    """pandas/numpy values -> plain Python (NaN and NA -> None) for validation; a numpy
    array (a list cell of a pandas frame read from Arrow) -> a list."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.ndarray):
        return [plain_value(v) for v in value.tolist()]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return plain_value(value.item())
    return value


def records(df: pd.DataFrame, name: str, declared: Declared = ()) -> list[dict[str, Any]]:
    """Rows of `df` restricted to contract `name`'s columns, as plain Python values."""
    schema = arrow_schema(name, declared)
    cols = [c for c in schema.names if c in df.columns]
    types = [schema.field(c).type for c in cols]
    return [{c: py_value(v, t) for c, t, v in zip(cols, types, row)}
            for row in df[cols].itertuples(index=False, name=None)]


def plain_rows(name: str, rows: Iterable[dict[str, Any]], declared: Declared = ()) -> list[dict[str, Any]]:
    """Rows as plain Python values of contract `name`'s types (lists, dicts, None for NaN);
    columns outside the contract as plain_value gives them."""
    schema = arrow_schema(name, declared)
    types = {f.name: f.type for f in schema}
    return [{k: py_value(v, types[k]) if k in types else plain_value(v) for k, v in r.items()} for r in rows]


def to_table(name: str, rows: list[dict[str, Any]] | pd.DataFrame, declared: Declared = ()) -> pa.Table:
    """Validate rows against contract `name` (with the run's `declared` columns) and build
    a table with its exact Arrow schema."""
    if isinstance(rows, pd.DataFrame):
        rows = records(rows, name, declared)
    else:
        rows = plain_rows(name, rows, declared)
    validate_rows(name, rows, declared)
    schema = arrow_schema(name, declared)
    timestamps = [f.name for f in schema if _has_timestamp(f.type)]
    if timestamps:
        rows = [{**r, **{c: _arrow_value(r.get(c), schema.field(c).type) for c in timestamps}} for r in rows]
    return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
