"""The data contracts in curation/contracts/*.schema.json (linked from the repository's
schemas/), and validation of what the code writes.

JSON Schema is the language-neutral contract; the Arrow schema of each parquet file is
derived from it so column names and types cannot drift from the documented contract.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable

import math

import fastjsonschema
import jsonschema
import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import CurationError
from .paths import CONTRACTS_DIR

_ARROW_TYPES = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


class SchemaViolation(CurationError):
    """The code was about to write a row that breaks a data contract."""


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The JSON Schema called `name` ("sidecar", "ledger", "manifest")."""
    with open(CONTRACTS_DIR / f"{name}.schema.json", encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@functools.lru_cache(maxsize=None)
def _fast_check(name: str):
    """Compiled validator (~25x faster than jsonschema): every written row is checked."""
    return fastjsonschema.compile(load(name))


def columns(name: str) -> list[str]:
    return list(load(name)["properties"])


def _arrow_type(prop: dict) -> pa.DataType:
    if "const" in prop or "enum" in prop:
        return pa.string()
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    concrete = [t for t in types if t != "null"]
    return _ARROW_TYPES[concrete[0]] if concrete else pa.string()


@functools.lru_cache(maxsize=None)
def arrow_schema(name: str) -> pa.Schema:
    """Arrow schema with the contract's columns, in the contract's order."""
    props = load(name)["properties"]
    return pa.schema([pa.field(col, _arrow_type(p)) for col, p in props.items()])


def validate_rows(name: str, rows: Iterable[dict[str, Any]]) -> None:
    """Raise SchemaViolation naming the first row (by uid) that breaks contract `name`."""
    fast = _fast_check(name)
    for row in rows:
        try:
            fast(row)
            continue
        except fastjsonschema.JsonSchemaException as exc:
            message, where = exc.message, "(row)"
        # jsonschema words the error better: use it only for the row that failed.
        err = jsonschema.exceptions.best_match(_validator(name).iter_errors(row))
        if err is not None:
            message, where = err.message, "/".join(str(p) for p in err.absolute_path) or "(row)"
        raise SchemaViolation(f"{name} row uid={row.get('uid', '?')} breaks contract curation/contracts/{name}.schema.json at {where}: {message}")


def validate_document(name: str, doc: dict) -> None:
    validate_rows(name, [doc])


def plain_value(value: Any) -> Any:
    """pandas/numpy values -> plain Python (NaN and NA -> None) for validation."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return plain_value(value.item())
    return value


def records(df: pd.DataFrame, name: str) -> list[dict[str, Any]]:
    """Rows of `df` restricted to contract `name`'s columns, as plain Python values."""
    cols = [c for c in columns(name) if c in df.columns]
    return [{c: plain_value(v) for c, v in zip(cols, row)} for row in df[cols].itertuples(index=False, name=None)]


def to_table(name: str, rows: list[dict[str, Any]] | pd.DataFrame) -> pa.Table:
    """Validate rows against contract `name` and build a table with its exact Arrow schema."""
    if isinstance(rows, pd.DataFrame):
        rows = records(rows, name)
    else:
        rows = [{k: plain_value(v) for k, v in r.items()} for r in rows]
    validate_rows(name, rows)
    schema = arrow_schema(name)
    return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
