"""Plain-Python (JSON-serialisable) form of dp_accounting events.

An event becomes ``{"type": "<DpEvent class name>", <field>: <value>, ...}`` with nested
events as nested dicts and sequences as lists. Only classes defined in
``dp_accounting.dp_event`` are ever instantiated when loading, so a state dict cannot
make privgrad import or call arbitrary code.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import attr
import dp_accounting
from dp_accounting import dp_event as dp_event_module

from privgrad.accounting.errors import LedgerStateError

__all__ = ["event_from_dict", "event_to_dict"]


def _known_event_classes() -> dict[str, type[dp_accounting.DpEvent]]:
    classes: dict[str, type[dp_accounting.DpEvent]] = {}
    for name in dir(dp_event_module):
        obj = getattr(dp_event_module, name)
        if isinstance(obj, type) and issubclass(obj, dp_accounting.DpEvent):
            classes[obj.__name__] = obj
    return classes


_EVENT_CLASSES = _known_event_classes()


def _value_to_plain(value: Any) -> Any:
    if isinstance(value, dp_accounting.DpEvent):
        return event_to_dict(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        result = float(value)
        if not math.isfinite(result):
            raise LedgerStateError(
                f"Cannot serialise the non-finite number {value!r} to plain JSON. "
                "Fix: record events with finite parameters."
            )
        return result
    if isinstance(value, (list, tuple)):
        return [_value_to_plain(v) for v in value]
    raise LedgerStateError(
        f"Cannot serialise the value {value!r} of type {type(value).__name__} inside a "
        "privacy event. Fix: build events from dp_accounting's event classes with "
        "numeric parameters."
    )


def event_to_dict(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """Converts a dp_accounting event into nested plain dicts, lists and numbers.

    Args:
        event: Any event defined in ``dp_accounting.dp_event``.

    Returns:
        A JSON-serialisable dict; :func:`event_from_dict` inverts it.

    Raises:
        LedgerStateError: If the event is not a dp_accounting event or holds values
            that have no plain form.
    """
    cls = type(event)
    if _EVENT_CLASSES.get(cls.__name__) is not cls:
        raise LedgerStateError(
            f"{event!r} is not one of dp_accounting's event classes, so it cannot be "
            "saved and restored safely. Fix: use the classes of dp_accounting.dp_event."
        )
    result: dict[str, Any] = {"type": cls.__name__}
    for field in attr.fields(cls):
        result[field.name] = _value_to_plain(getattr(event, field.name))
    return result


def _value_from_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return event_from_dict(value)
    if isinstance(value, list):
        return [_value_from_plain(v) for v in value]
    return value


def event_from_dict(data: dict[str, Any]) -> dp_accounting.DpEvent:
    """Rebuilds an event produced by :func:`event_to_dict`.

    Args:
        data: The dict form of an event.

    Returns:
        An event equal to the one that was serialised.

    Raises:
        LedgerStateError: If ``data`` is not the dict form of a dp_accounting event.
    """
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise LedgerStateError(
            f"{data!r} is not a serialised privacy event (a dict with a 'type' key). "
            "Fix: pass what PrivacyLedger.state_dict() returned, unmodified."
        )
    cls = _EVENT_CLASSES.get(data["type"])
    if cls is None:
        raise LedgerStateError(
            f"Unknown privacy event type {data['type']!r}; this dp_accounting version "
            f"knows {sorted(_EVENT_CLASSES)}. Fix: load the state with the dp_accounting "
            "version that saved it, or newer."
        )
    names = {field.name for field in attr.fields(cls)}
    extra = set(data) - names - {"type"}
    if extra:
        raise LedgerStateError(
            f"Serialised {data['type']} has unexpected fields {sorted(extra)}; it may "
            "have been edited or saved by another library. Fix: pass what "
            "PrivacyLedger.state_dict() returned, unmodified."
        )
    kwargs = {k: _value_from_plain(v) for k, v in data.items() if k != "type"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise LedgerStateError(
            f"Cannot rebuild {data['type']} from {kwargs!r}: {err}. Fix: pass what "
            "PrivacyLedger.state_dict() returned, unmodified."
        ) from err
