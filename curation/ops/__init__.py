"""Operators: one module per family. See base.py for the interface."""

from .base import GlobalOp, MapOp, Operator, Resources, register, registry

__all__ = ["GlobalOp", "MapOp", "Operator", "Resources", "register", "registry"]
