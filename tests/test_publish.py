"""`curate run --out s3://...`: the run works in a local stage folder and publishes what a
user reads (curation/publish.py), against a moto S3 server on 127.0.0.1 (conftest's s3):
order (data, small files, manifests, _SUCCESS), resume after a lost object or an upload
cut short, stale objects, refusals; check_published_run checks the end of the one Ray
run, tests/test_inputs.py's s3 run."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import publish
from curation.cli import main
from curation.errors import ConfigError, CurationError, InputError

URL = "s3://bkt/runs/one"


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_run(root: Path, rng) -> set[str]:
    """A finished run folder as `curate run` leaves it (real tars, parquet, npy); returns
    the files a user reads."""
    def put(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    big = bytes(rng.integers(0, 255, 5 * publish.CHUNK + 100, dtype=np.uint8))  # several writes
    put("tiers/a/a-000000.tar", tar_of({"u0.jpg": big, "u0.txt": b"a caption"}))
    put("tiers/a/a-000001.tar", tar_of({"u1.jpg": b"\xff\xd8small", "u1.txt": b"another"}))
    put("tiers/b/b-000000.tar", tar_of({"u2.jpg": b"\xff\xd8tiny", "u2.txt": b"third"}))
    for shard in ("tiers/a/a-000000", "tiers/a/a-000001", "tiers/b/b-000000"):
        buf = io.BytesIO()
        pq.write_table(pa.table({"uid": [shard[-6:]]}), buf)
        put(f"{shard}.parquet", buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 4), np.float16))
    put("tiers/a/a-000000.clip.npy", buf.getvalue())
    for tier in "ab":
        put(f"tiers/{tier}/manifest.json", json.dumps({"tier": tier}).encode())
        put(f"tiers/{tier}/README.md", b"---\nconfigs: []\n---\n")
    put("ledger.parquet", b"PAR1 ledger")
    put("summary.json", b"{}")
    put("_work/run.json", json.dumps({"config_hash": "c1", "raw_shards": {"x.tar": 10}}).encode())
    put("_SUCCESS", b"")
    # never published: intermediate state and leftovers
    put("_work/annotated/x/part-0.parquet", b"stage A")
    put("_work/entries/a-000000.json", b"{}")
    put("tiers/a/a-000002.tar.tmp", b"half")
    return {"tiers/a/a-000000.tar", "tiers/a/a-000001.tar", "tiers/b/b-000000.tar", "tiers/a/a-000000.parquet",
            "tiers/a/a-000001.parquet", "tiers/b/b-000000.parquet", "tiers/a/a-000000.clip.npy",
            "tiers/a/manifest.json", "tiers/b/manifest.json", "tiers/a/README.md", "tiers/b/README.md",
            "ledger.parquet", "summary.json", "_work/run.json", "_SUCCESS"}


def remote(filesystem, url: str = URL) -> dict[str, bytes]:
    """Every object under the url (but our upload record), by relative name."""
    from pyarrow import fs

    base = url[len("s3://"):]
    out = {}
    for info in filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True)):
        if info.type == fs.FileType.File:
            rel = info.path[len(base) + 1:]
            if rel not in (publish.RECORD, publish.EXPORT_RECORD):
                with filesystem.open_input_stream(info.path, compression=None) as f:
                    out[rel] = f.read()
    return out


def local_files(root: Path, names) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in names}


@pytest.fixture(autouse=True)
def small_writes(monkeypatch):
    """64 KiB writes (pyarrow buffers them into parts): a file of several writes stays small."""
    monkeypatch.setattr(publish, "CHUNK", 1 << 16)


@pytest.fixture
def uploads(monkeypatch):
    """The files uploaded, in the order their uploads completed."""
    done = []
    real = publish._Store.put

    def put(self, local, rel):
        real(self, local, rel)
        done.append(rel)

    monkeypatch.setattr(publish._Store, "put", put)
    return done


def test_publish_uploads_what_a_user_reads_manifests_and_success_last(tmp_path, s3, uploads):
    filesystem, _ = s3
    expected = fake_run(tmp_path / "run", np.random.default_rng(0))
    stats = publish.publish_run(tmp_path / "run", URL)
    assert remote(filesystem) == local_files(tmp_path / "run", expected)  # byte for byte, nothing else
    assert stats["uploaded"] == len(expected) == len(uploads)
    step = {rel: 0 if rel.startswith("tiers/") and rel.rsplit("/", 1)[1] not in ("manifest.json", "README.md")
            else 2 if rel.endswith("manifest.json") else 3 if rel == "_SUCCESS" else 1 for rel in expected}
    order = [step[rel] for rel in uploads]
    assert order == sorted(order) and uploads[-1] == "_SUCCESS"  # a manifest never before what it names

    uploads.clear()
    assert publish.publish_run(tmp_path / "run", URL)["uploaded"] == 0 and uploads == []  # idempotent


def test_a_lost_object_is_uploaded_again_alone(tmp_path, s3, uploads):
    filesystem, _ = s3
    expected = fake_run(tmp_path / "run", np.random.default_rng(1))
    publish.publish_run(tmp_path / "run", URL)
    filesystem.delete_file("bkt/runs/one/tiers/a/a-000001.tar")
    uploads.clear()
    publish.publish_run(tmp_path / "run", URL)
    assert uploads == ["tiers/a/a-000001.tar"]  # only missing: filled in under the manifests
    assert remote(filesystem) == local_files(tmp_path / "run", expected)


def test_changed_and_stale_objects_take_the_manifests_down_first(tmp_path, s3, uploads):
    filesystem, _ = s3
    run = tmp_path / "run"
    expected = fake_run(run, np.random.default_rng(2))
    publish.publish_run(run, URL)
    # an unfinished run of another recipe left a shard this one does not have
    with filesystem.open_output_stream("bkt/runs/one/tiers/c/c-000000.tar", compression=None) as f:
        f.write(b"old")
    with filesystem.open_output_stream("bkt/runs/one/tiers/c/manifest.json", compression=None) as f:
        f.write(b"{}")
    (run / "tiers/b/b-000000.parquet").write_bytes(b"other rows")  # changed content
    uploads.clear()
    stats = publish.publish_run(run, URL)
    assert stats["deleted"] == 2
    assert uploads[0] == "tiers/b/b-000000.parquet"
    assert sorted(uploads[1:3]) == ["tiers/a/manifest.json", "tiers/b/manifest.json"] and uploads[3:] == ["_SUCCESS"]
    assert remote(filesystem) == local_files(run, expected)


class _CutShort:
    """An S3 filesystem whose uploads of one file fail at their second write."""

    def __init__(self, real, name: str):
        self.real, self.name = real, name

    def __getattr__(self, attr):
        return getattr(self.real, attr)

    def open_output_stream(self, path, **kw):
        stream = self.real.open_output_stream(path, **kw)
        if not path.endswith(self.name):
            return stream
        writes = []

        class Stream:
            def write(self, data):
                writes.append(len(data))
                if len(writes) == 2:
                    raise OSError("connection reset by peer")
                return stream.write(data)

            def close(self):
                stream.close()

        return Stream()


def test_an_upload_cut_short_leaves_no_object_and_a_rerun_completes(tmp_path, s3, monkeypatch):
    filesystem, _ = s3
    run = tmp_path / "run"
    expected = fake_run(run, np.random.default_rng(3))
    from curation import inputs

    real = inputs.s3_filesystem
    monkeypatch.setattr(inputs, "s3_filesystem", lambda *a, **k: _CutShort(real(*a, **k), "a-000000.tar"))
    with pytest.raises(publish.PublishError, match="cannot write s3://bkt/runs/one/tiers/a/a-000000.tar: "
                                                   "connection reset.*run the same command again"):
        publish.publish_run(run, URL, workers=1)
    got = remote(filesystem)
    assert "tiers/a/a-000000.tar" not in got and "_SUCCESS" not in got
    assert not any(rel.endswith("manifest.json") for rel in got)
    monkeypatch.setattr(inputs, "s3_filesystem", real)
    stats = publish.publish_run(run, URL)
    assert remote(filesystem) == local_files(run, expected)
    assert 0 < stats["uploaded"] < len(expected)  # what went up before the failure is not sent again


def test_a_finished_run_of_another_recipe_is_refused(tmp_path, s3):
    run = tmp_path / "run"
    fake_run(run, np.random.default_rng(4))
    publish.publish_run(run, URL)
    publish.check_destination(URL, run / "_work" / "run.json")  # the same run: fine
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config_hash": "c2", "raw_shards": {"x.tar": 10}}))
    with pytest.raises(ConfigError, match="finished run of another pipeline config"):
        publish.check_destination(URL, other)
    other.write_text(json.dumps({"config_hash": "c1", "raw_shards": {"y.tar": 10}, "input": "/raw"}))
    with pytest.raises(InputError, match="other raw shards"):
        publish.check_destination(URL, other)
    publish.check_destination("s3://bkt/runs/two", other)  # an empty prefix
    with pytest.raises(InputError, match="bucket nobucket does not exist"):  # before any work, not after
        publish.check_destination("s3://nobucket/x", other)


def test_destinations_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = publish.destination("s3://bkt/runs/one/")
    assert d.url == URL and d.local == publish.stage_folder(URL) == publish.destination("S3://bkt/runs/one").local
    assert d.local.parent == tmp_path / "cache" / "curation" / "stage"
    assert publish.destination(URL, tmp_path / "st").local == tmp_path / "st"
    assert publish.destination(tmp_path / "out") == publish.Destination(tmp_path / "out", None)
    for out, kw, error in [
        (tmp_path / "out", {"stage_dir": tmp_path / "st"}, "--stage-dir is for --out s3://"),
        ("gs://bkt/x", {}, "gs:// is not supported"),
        ("s3://bkt/runs/*", {}, "plain path"),
        ("s3://bkt/a/../b", {}, "plain path"),
        ("s3:///x", {}, "not a bucket name"),
        (URL, {"ray_address": "10.0.0.1:6379"}, "needs --stage-dir on a filesystem every node shares"),
        (URL, {"stage_dir": "s3://bkt/stage"}, "local folder"),
    ]:
        with pytest.raises(CurationError, match=error):
            publish.destination(out, **kw)


def test_readers_point_at_the_stage_folder(tmp_path, monkeypatch, capsys):
    from curation.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for argv in (["query", "SELECT 1", "--root", URL], ["verify", "--root", URL], ["plan", "--root", URL]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"curate: error: --root {URL}: ") and str(publish.stage_folder(URL)) in err[0]


# ------------------------------------------------------------------- end to end
def check_published_run(filesystem, proc, args: tuple, stage: Path, url: str, tmp_path: Path) -> None:
    """After `curate run ... --out URL --stage-dir STAGE` (args; proc its result; the one
    Ray run of these tests is tests/test_inputs.py's s3 run): the objects are the stage
    folder's user files byte for byte; a lost object comes back alone on a re-run (the
    stage folder is finished: no Ray); an export to s3:// is uploaded, records last."""
    assert f"published {url}: uploaded" in proc.stderr and f"output:  {url}" in proc.stdout
    names = {rel for step in publish.run_files(stage) for rel in step}
    assert {"ledger.parquet", "summary.json", "_SUCCESS", "_work/run.json"} <= names
    assert any(n.endswith(".tar") for n in names) and any(n.endswith("/manifest.json") for n in names)
    assert remote(filesystem, url) == local_files(stage, names)

    tar = sorted(n for n in names if n.endswith(".tar"))[0]
    filesystem.delete_file(f"{url[len('s3://'):]}/{tar}")
    import contextlib

    from curation.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main([str(a) for a in args]) == 0  # in this process (its env is `env`): the stage is finished, no Ray
    assert f"published {url}: uploaded 1 of {len(names)} files" in err.getvalue()
    assert remote(filesystem, url) == local_files(stage, names)

    tier = json.loads((stage / tar).with_name("manifest.json").read_text())["tier"]
    result = publish.export("sharegpt", stage, "s3://bkt/exports/x", tier=tier, stage_dir=tmp_path / "exp")
    written = {p.relative_to(tmp_path / "exp").as_posix() for p in (tmp_path / "exp").rglob("*")
               if p.is_file() and not p.name.startswith(".")}
    assert result["records"] > 0 and result["published"]["uploaded"] == len(written) > result["records"]
    assert remote(filesystem, "s3://bkt/exports/x") == local_files(tmp_path / "exp", written)


@pytest.mark.parametrize("argv", [
    ["demo", "--out", "s3://bkt/demo"],
    ["crawl", "--kind", "image_text", "--input", "urls.parquet", "--out", "s3://bkt/raw"],
    ["report", "--root", "somewhere", "--out", "s3://bkt/report.html"],
])
def test_commands_that_write_locally_refuse_an_object_store_output(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error: --out s3://") and "writes to a local path" in err
    assert not list(tmp_path.iterdir())  # no folder named "s3:"
