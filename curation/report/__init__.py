"""A self-contained HTML report of a run: what was kept and why the rest was not,
tier sizes, and the distributions behind the filters."""

from .html import write_report

__all__ = ["write_report"]
