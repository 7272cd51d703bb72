"""User-facing errors: the CLI prints these as one line, never a traceback."""


class CurationError(Exception):
    """A problem the user can fix (bad config, missing input, unreadable shard)."""


class ConfigError(CurationError):
    """The pipeline YAML is malformed or names something unknown."""


class InputError(CurationError):
    """An input path is missing, empty or unreadable."""


class AccountingError(CurationError):
    """Inputs != kept + dropped + failed: a sample was lost or counted twice."""


class DiskFullError(CurationError):
    """No space left (or a file-size limit) while writing output; free space and resume."""


NO_SPACE_ERRNOS = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT


def curation_error_in(exc: BaseException) -> CurationError | None:
    """The CurationError behind an exception that crossed Ray (a task's error arrives
    wrapped, often twice), or None."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, CurationError):  # a RayTaskError carries the original as .cause
            return cause
        if isinstance(e, CurationError):
            return e
        stack.extend([e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None])
    return _from_text(str(exc))


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def _from_text(text: str) -> CurationError | None:
    """Ray Data may deliver a task's error only as its formatted traceback: find the
    last `curation....SomeError: message` line in it."""
    import re

    known = {c.__name__: c for c in [CurationError, *_subclasses(CurationError)]}
    found = None
    for m in re.finditer(r"^curation\.[\w.]+\.(\w+): (.+)$", text, flags=re.M):
        if m.group(1) in known:
            found = known[m.group(1)](m.group(2).strip())
    return found
