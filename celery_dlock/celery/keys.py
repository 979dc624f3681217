"""Lock keys for task calls: argument hashes, templates and callables.

A :class:`KeySpec` is built once, when a task is decorated, and checked
against the task's signature then, so a template naming an unknown argument
fails at import time.  At run time it turns one call's arguments into a key.

* ``None``: ``<task name>:<sha256 of the bound arguments>``.  Arguments are
  bound with :func:`inspect.signature` and defaults applied, so ``f(1)`` and
  ``f(a=1)`` hash alike, then serialised with kombu's JSON (which knows UUID,
  datetime and Decimal) with sorted keys.
* ``"ledger:{account_id}"``: a :meth:`str.format` template over argument
  names.  A value whose text is longer than :data:`MAX_VALUE_LENGTH` is
  replaced by its hash, so keys stay bounded whatever the arguments.
* a callable: called with the task's arguments; it returns the key.
"""

from __future__ import annotations

import hashlib
import inspect
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from kombu.utils.json import dumps as kombu_dumps

__all__ = ["MAX_KEY_LENGTH", "MAX_VALUE_LENGTH", "KeySpec"]

#: Longer rendered argument values are hashed in template keys.
MAX_VALUE_LENGTH: Final = 64

#: Longer keys from a callable are hashed, keeping a readable head.
MAX_KEY_LENGTH: Final = 256

_FORMATTER = string.Formatter()

KeyTemplate = str | Callable[..., str] | None


class KeySpec:
    """How one task turns its arguments into a lock key."""

    def __init__(self, spec: KeyTemplate, *, task_name: str, signature: inspect.Signature | None) -> None:
        self.task_name = task_name
        self.signature = signature
        self._template: str | None = None
        self._callable: Callable[..., str] | None = None
        if spec is None:
            pass
        elif isinstance(spec, str):
            if not spec:
                raise ValueError(f"key: empty key template for task {task_name!r}")
            self._template = spec
            self._check_template(spec)
        elif callable(spec):
            self._callable = spec
        else:
            raise TypeError(
                f"key: expected None, a template string or a callable for task {task_name!r}, got {type(spec).__name__}"
            )

    def __repr__(self) -> str:
        kind = self._template or getattr(self._callable, "__name__", None) or "<argument hash>"
        return f"<KeySpec {self.task_name} {kind}>"

    def build(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The lock key for one call with ``args`` and ``kwargs``."""
        if self._callable is not None:
            return self._call(args, kwargs)
        arguments = self._bind(args, kwargs)
        if self._template is not None:
            return self._render(self._flatten(arguments))
        return f"{self.task_name}:{_digest(arguments, self.task_name)}"

    # -- the three kinds -----------------------------------------------------

    def _call(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        assert self._callable is not None
        key = self._callable(*args, **kwargs)
        if not isinstance(key, str) or not key:
            raise TypeError(
                f"key: the key callable of task {self.task_name!r} must return a non-empty str, got {key!r}"
            )
        if len(key) > MAX_KEY_LENGTH:
            head = key[:64]
            return f"{head}#{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"
        return key

    def _render(self, arguments: Mapping[str, Any]) -> str:
        assert self._template is not None
        parts: list[str] = []
        for literal, field, spec, conversion in _FORMATTER.parse(self._template):
            parts.append(literal)
            if field is None:
                continue
            try:
                value, _ = _FORMATTER.get_field(field, (), arguments)
            except (KeyError, AttributeError, IndexError) as exc:
                raise TypeError(
                    f"task {self.task_name!r}: key template {self._template!r} cannot render "
                    f"{{{field}}} for this call: {exc!r}"
                ) from None
            text = _FORMATTER.format_field(_FORMATTER.convert_field(value, conversion), spec or "")
            if len(text) > MAX_VALUE_LENGTH or not _is_utf8(text):
                text = "#" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            parts.append(text)
        return "".join(parts)

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.signature is None:
            return {"args": list(args), "kwargs": dict(kwargs)}
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.task_name!r}: cannot bind arguments for its lock key: {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def _flatten(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Arguments by name, with those caught by ``**kwargs`` lifted to the top."""
        if self.signature is None:
            return arguments
        for param in self.signature.parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD and param.name in arguments:
                return {**arguments, **arguments[param.name]}
        return arguments

    def _check_template(self, template: str) -> None:
        try:
            fields = [field for _, field, _, _ in _FORMATTER.parse(template) if field is not None]
        except ValueError as exc:
            raise ValueError(f"key: malformed template {template!r} for task {self.task_name!r}: {exc}") from None
        if self.signature is None:
            return
        params = self.signature.parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for field in fields:
            name = _field_root(field)
            if not name or name.isdigit():
                raise ValueError(
                    f"key: template {template!r} of task {self.task_name!r} uses a positional "
                    "field; name the argument instead"
                )
            if name not in params and not accepts_any:
                raise ValueError(
                    f"key: template {template!r} of task {self.task_name!r} names {name!r}, "
                    f"which is not one of its arguments ({', '.join(params) or 'none'})"
                )


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _field_root(field: str) -> str:
    for index, char in enumerate(field):
        if char in ".[":
            return field[:index]
    return field


def _digest(arguments: Mapping[str, Any], task_name: str) -> str:
    try:
        text = kombu_dumps(arguments, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"task {task_name!r}: arguments cannot be serialised for its lock key ({exc}); "
            "pass JSON-serialisable arguments or give a key= template or callable"
        ) from None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
