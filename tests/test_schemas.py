"""The data contracts: valid documents pass, each kind of violation is named."""

import re

import pytest

from curation import schemas
from curation.schemas import SchemaViolation

UID = "0123456789abcdef"
SIDECAR = {"uid": UID, "kind": "image_text", "source": "s", "status": "kept", "tier": "t", "shard": "t-000000.tar",
           "key": UID, "sha256": "a" * 64, "width": 10, "height": 10, "pipeline": "p", "config_hash": "b" * 16,
           "op_versions": {}}
MANIFEST = {"tier": "t", "pipeline": "p", "config_hash": "b" * 16, "curation_version": "0", "num_samples": 1,
            "num_bytes": 10, "shards": [{"name": "t-0.tar", "sidecar": "t-0.parquet", "samples": 1, "bytes": 10, "sha256": "c" * 64}]}


def test_valid_documents_pass():
    schemas.validate_rows("sidecar", [SIDECAR])
    schemas.validate_document("manifest", MANIFEST)
    schemas.validate_rows("ledger", [{"uid": UID, "source": "s", "stage": "crawl", "status": "dropped", "reason": "opt_out"}])


@pytest.mark.parametrize("name, doc, where", [
    ("sidecar", {**SIDECAR, "uid": "XYZ"}, "uid"),
    ("sidecar", {**SIDECAR, "status": "dropped"}, "status"),
    ("sidecar", {**SIDECAR, "surprise": 1}, "(row)"),
    ("ledger", {"uid": UID, "source": "s", "stage": "crawl", "status": "kept"}, "(row)"),  # kept needs tier + shard
    ("ledger", {"uid": UID, "source": "s", "stage": "elsewhere", "status": "dropped", "reason": "x"}, "stage"),
    ("manifest", {**MANIFEST, "shards": [{**MANIFEST["shards"][0], "sha256": "short"}]}, "shards/0/sha256"),
])
def test_violations_are_named(name, doc, where):
    with pytest.raises(SchemaViolation, match=re.escape(f"curation/contracts/{name}.schema.json at {where}")):
        schemas.validate_rows(name, [doc])


def test_arrow_schema_follows_the_contract():
    assert schemas.arrow_schema("sidecar").names == list(schemas.load("sidecar")["properties"])
    assert str(schemas.arrow_schema("sidecar").field("width").type) == "int64"
