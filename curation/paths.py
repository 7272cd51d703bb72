"""Where the bundled data contracts and recipes live: inside the package, so a wheel
install and a Ray worker that receives the package through `py_modules` have them too.

The repository's top-level `schemas/` and `pipelines/` hold relative symlinks to these
files (one home per file; nothing outside the package is ever read by the code).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
CONTRACTS_DIR = PACKAGE_DIR / "contracts"  # <name>.schema.json: sidecar, ledger, manifest
RECIPES_DIR = PACKAGE_DIR / "recipes"      # <name>.yaml: the bundled pipelines


def bundled_recipes() -> list[str]:
    """Names of the bundled pipelines, e.g. ["demo", "llava_onevision"]."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def bundled_pipeline(name: str) -> Path:
    """Path of the bundled recipe `name` (e.g. "demo"), inside the package."""
    return RECIPES_DIR / f"{name}.yaml"


def find_pipeline(spec: str | Path) -> Path:
    """What `curate run PIPELINE` names: a YAML file (`pipelines/demo.yaml`, `/x/p.yaml`),
    or a bare name (`demo`, `demo.yaml`: no directory part) of a bundled recipe. An
    existing file always wins; a bare name that is not a file is looked up in the
    package. Raises ConfigError naming the bundled recipes if neither exists."""
    path = Path(spec)
    if path.is_file():
        return path
    text = str(spec)
    bare = "/" not in text and "\\" not in text and path.suffix in ("", ".yaml")
    if bare and bundled_pipeline(path.stem).is_file():
        return bundled_pipeline(path.stem)
    raise ConfigError(f"pipeline file not found: {spec} (bundled recipes, usable by name: "
                      f"{', '.join(bundled_recipes()) or 'none'})")
