"""The package is whole without the repository: the wheel carries the data contracts and
the bundled recipes, and a non-editable install runs a pipeline from a folder that is
not the repository.

The fresh venvs here do not reinstall the dependencies: a .pth file puts this venv's
site-packages on their path. Plain directory lines in a .pth do not process the .pth
files inside that directory, so this venv's editable install of `curation` (a .pth and
an import finder) stays invisible: `import curation` fails until the wheel is installed.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from .conftest import REPO

pytestmark = pytest.mark.slow

PACKAGE = REPO / "curation"


def make_venv(path: Path) -> Path:
    """A venv with this venv's dependencies but no `curation`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    Path(site, "_curation_test_deps.pth").write_text("\n".join(deps) + "\n")
    return python


def venv_env(python: Path) -> dict:
    """The environment of a process that must not see the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", VIRTUAL_ENV=str(python.parent.parent))
    return env


def run_in(python: Path, args: list, cwd: Path, check=True, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=venv_env(python), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def bundled_files() -> set[str]:
    """The package's data files, as wheel member names."""
    return {f"curation/{p.relative_to(PACKAGE).as_posix()}"
            for p in [*PACKAGE.glob("contracts/*.schema.json"), *PACKAGE.glob("recipes/*.yaml")]}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (nothing is written into the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / "curation", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--wheel-dir", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = (root / "dist").glob("curation-*.whl")
    return whl


def test_top_level_dirs_link_into_the_package():
    """schemas/ and pipelines/ hold links to the package's files: one home per file."""
    for top, inside, pattern in (("schemas", "contracts", "*.schema.json"), ("pipelines", "recipes", "*.yaml")):
        links = sorted((REPO / top).glob(pattern))
        assert [p.name for p in links] == sorted(p.name for p in (PACKAGE / inside).glob(pattern))
        for link in links:
            assert link.is_symlink() and link.resolve() == (PACKAGE / inside / link.name).resolve(), link


def test_wheel_carries_contracts_and_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = bundled_files()
    assert {"curation/contracts/sidecar.schema.json", "curation/contracts/ledger.schema.json",
            "curation/contracts/manifest.schema.json", "curation/recipes/demo.yaml"} <= expected
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("schemas/", "pipelines/"))]


def raw_shard(path: Path) -> int:
    """A WebDataset tar of image-caption samples: good ones, a too-small image, a short
    caption and an exact copy. Returns the number of samples."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):  # noise: distinct perceptual hashes
        img = Image.fromarray(rng.integers(0, 256, (48, 64 + 8 * i, 3), dtype=np.uint8))
        samples.append((img, f"a small test picture number {i} full of coloured noise"))
    samples.append((Image.new("RGB", (16, 16), (0, 0, 255)), "a blue square that is far too small"))
    samples.append((Image.new("RGB", (64, 64), (0, 200, 0)), "green"))
    samples.append(samples[0])
    with tarfile.open(path, "w") as tar:
        for i, (img, text) in enumerate(samples):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("txt", text.encode()),
                              ("json", json.dumps({"caption": text}).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(samples)


RECIPE = """
name: tiny
seed: 0
ops:
  - op: decode_image
  - op: perceptual_hash
  - op: image_quality
    min_side: 32
  - op: caption_length
    min_words: 3
  - op: exact_dedup
  - op: near_dedup
    max_hamming: 0
tiers:
  - name: detailed
    where: "len(string_split(text, ' ')) >= 10"
  - name: alignment
    where: "true"
"""


def test_installed_wheel_runs_a_pipeline_outside_the_repository(wheel, tmp_path):
    python = make_venv(tmp_path / "venv")
    work = tmp_path / "work"  # cwd of every command: not the repository
    work.mkdir()
    probe = "import importlib.util; print(importlib.util.find_spec('curation'))"
    assert run_in(python, [python, "-c", probe], work).stdout.strip() == "None"  # the editable install is invisible

    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--ignore-installed", "--no-compile", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = Path(run_in(python, [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work).stdout.strip())

    check = textwrap.dedent("""
        import json, curation
        from curation import config, paths, schemas
        print(json.dumps({"package": curation.__file__, "contracts": str(paths.CONTRACTS_DIR),
                          "columns": len(schemas.columns("ledger")), "manifest": sorted(schemas.load("manifest")),
                          "demo": config.load("demo").path, "recipes": paths.bundled_recipes()}))
    """)
    got = json.loads(run_in(python, [python, "-c", check], work).stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(site / "curation")
    assert Path(got["contracts"]) == site / "curation" / "contracts"
    assert got["columns"] > 5 and "properties" in got["manifest"]
    assert Path(got["demo"]) == site / "curation" / "recipes" / "demo.yaml"
    assert set(got["recipes"]) >= {"demo", "llava_onevision"}

    curate = python.parent / "curate"  # the console script the wheel installed
    missing = run_in(python, [curate, "run", "no_such_recipe", "--input", work, "--out", work / "o"], work, check=False)
    assert missing.returncode == 2 and "bundled recipes" in missing.stderr and "demo" in missing.stderr, missing.stderr

    raw = work / "raw"
    raw.mkdir()
    n = raw_shard(raw / "image_text-r000-00000.tar")
    (work / "tiny.yaml").write_text(RECIPE)
    run_in(python, [curate, "run", "tiny.yaml", "--input", "raw", "--out", "out"], work, timeout=600)

    out = work / "out"
    assert (out / "_SUCCESS").exists()
    ledger = pd.read_parquet(out / "ledger.parquet")
    assert len(ledger) == n and ledger["uid"].is_unique
    reasons = ledger.set_index("status")["reason"]
    assert (ledger["status"] == "kept").sum() == 6, ledger[["status", "reason"]]
    assert sorted(reasons.loc[["dropped"]]) == ["caption_too_short", "duplicate_exact", "too_small"]
    manifests = {m.parent.name: json.loads(m.read_text()) for m in out.glob("tiers/*/manifest.json")}
    assert manifests["detailed"]["pipeline"] == "tiny" and manifests["detailed"]["num_samples"] == 6
    assert sum(m["num_samples"] for m in manifests.values()) == 6
    verify = run_in(python, [curate, "verify", "--root", "out"], work)
    assert "MISMATCH" not in verify.stdout
