"""Where the project's bundled data contracts and recipes live."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMAS_DIR = REPO_ROOT / "schemas"
PIPELINES_DIR = REPO_ROOT / "pipelines"


def bundled_pipeline(name: str) -> Path:
    """Path of a recipe shipped in pipelines/, e.g. bundled_pipeline("demo")."""
    return PIPELINES_DIR / f"{name}.yaml"
