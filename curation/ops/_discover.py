"""Import every module in curation.ops so their @register decorators run."""

import importlib
import pkgutil

from . import __path__ as _ops_path

for _mod in pkgutil.iter_modules(_ops_path):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__package__}.{_mod.name}")
