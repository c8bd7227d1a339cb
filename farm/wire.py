"""What a node says to the controller, and how the controller reads it.

A node speaks to the controller only through Dask events (``log_event`` on the node,
``subscribe_topic`` in the controller): plain msgpack, never a pickle. That holds for a
segment's outcome too: the controller never fetches a task's result or exception, which
Dask would unpickle in the controller's process, so a machine holding a stolen node
certificate can send lies about its own segments (which assembly's verification
catches) but never code. The scheduler side of the same rule is in
:mod:`farm.daskroles`, which keeps a node's messages free of anything Dask unpickles.
"""

from __future__ import annotations

import json
from typing import Any

PROGRESS_TOPIC = "farm-progress"  # a running attempt's fraction and message
NODE_TOPIC = "farm-node"  # each node's report: who it is, what it offers, whether it takes work
RESULT_TOPIC = "farm-result"  # an attempt's outcome, sent once as it ends
NODE_TOPICS = frozenset({PROGRESS_TOPIC, NODE_TOPIC, RESULT_TOPIC})
#: The key under which a cluster's scheduler stamps each farm event with the address of
#: the worker whose connection it came on (whatever the node wrote there is replaced).
SENDER = "farm-sender"

#: The keys of an outcome and the type each must have; anything else is dropped.
OUTCOME_FIELDS: dict[str, type | tuple[type, ...]] = {
    "ok": bool, "reason": str, "log": str, "node": str, "result": dict, "fatal": bool, "cancelled": bool,
    # the node was sent a segment by reference to a job it does not hold (it restarted)
    "missing_job": bool,
    # how long the attempt took on the node, in seconds: the controller sends a job whose
    # segments take less than a round trip several at a time (farm.scheduling.handout)
    "seconds": (int, float),
    # a segment of a parcel that its node handed back unstarted (the parcel ran long)
    "returned": bool,
}


class BadMessage(ValueError):
    """A node's message that is not what a farm node sends."""


def plain(value: Any) -> Any:
    """``value`` as JSON-shaped data (dicts, lists, str, numbers, bools, None): what both
    msgpack and the store carry. Paths and other objects become their text."""
    return json.loads(json.dumps(value, default=str))


def outcome_message(attempt_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """The event a node sends when an attempt ends."""
    return {"attempt": attempt_id, "outcome": plain(outcome)}


def read_outcome(message: Any) -> tuple[str, dict[str, Any]]:
    """``(attempt_id, outcome)`` from a node's outcome event, checked field by field.

    Raises :class:`BadMessage` for anything else, naming what was wrong.
    """
    if not isinstance(message, dict):
        raise BadMessage(f"an outcome must be a mapping, not {type(message).__name__}")
    attempt_id, outcome = message.get("attempt"), message.get("outcome")
    if not isinstance(attempt_id, str) or not attempt_id:
        raise BadMessage("an outcome without an attempt id")
    if not isinstance(outcome, dict) or not isinstance(outcome.get("ok"), bool):
        raise BadMessage(f"the outcome of attempt {attempt_id} has no 'ok' flag")
    checked: dict[str, Any] = {}
    for key, kind in OUTCOME_FIELDS.items():
        if key in outcome and outcome[key] is not None:
            if not isinstance(outcome[key], kind):
                raise BadMessage(f"the outcome of attempt {attempt_id} has a {type(outcome[key]).__name__} "
                                 f"for {key!r}, expected {getattr(kind, '__name__', kind)}")
            checked[key] = outcome[key]
    # msgpack hands lists over as tuples; the store and the processors expect JSON's shapes
    return attempt_id, plain(checked)
