"""Message -> array conversion of the node's inputs, ROS-free (duck-typed fields, unit-tested alone).

:func:`joint_state_vector` turns a ``sensor_msgs/JointState`` into the policy's state vector, or
raises :class:`InputRejected` whose ``reason`` is the short code the node counts
(``rejected.joint_states:<reason>``) and whose message is the logged line.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["InputRejected", "STATE_FIELDS", "joint_state_vector"]

#: state_field parameter -> the JointState fields concatenated into the state, in order
STATE_FIELDS = {"position": ("position",), "velocity": ("velocity",),
                "position_velocity": ("position", "velocity")}


class InputRejected(ValueError):
    """An input message cannot be used; ``reason``: a short code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def joint_state_vector(msg, state_field: str, state_dim: int, select: Sequence[str] = (),
                       select_optional: bool = False) -> tuple[np.ndarray, bool]:
    """The ``state_dim`` float32 state of a JointState-like ``msg`` (``name``, ``position``, ``velocity``)
    -> (vector, by_name). The joints are ``select`` by name, in that order, or, with no ``select`` (or
    ``select_optional`` and a message lacking one of them), the first values in message order
    (``by_name`` False). Rejected (:class:`InputRejected`): a used field whose length differs from
    the names (``length_mismatch``), duplicated names (``duplicate_names``), a selected joint missing
    (``missing_joint``), too few values (``too_few_values``), NaN/Inf or a value beyond float32
    (``non_finite``)."""
    fields = STATE_FIELDS[state_field]
    per = state_dim // len(fields)
    names = [str(n) for n in msg.name]
    values = {f: np.asarray(getattr(msg, f), dtype=np.float64).reshape(-1) for f in fields}
    if names:
        for f, v in values.items():
            if v.size != len(names):
                raise InputRejected("length_mismatch", f"joint_states rejected: {len(names)} names but {v.size} "
                                                       f"{f} values")
        if len(set(names)) != len(names):
            dups = sorted({n for n in names if names.count(n) > 1})
            raise InputRejected("duplicate_names", f"joint_states rejected: duplicated joint names {dups}")
    select = [str(n) for n in select if n]
    by_name = bool(select) and (not select_optional or set(select) <= set(names))
    if by_name:
        missing = [j for j in select if j not in names]
        if missing:
            raise InputRejected("missing_joint", f"joint_states rejected: joint missing: {missing} not in {names}")
        pos = {n: i for i, n in enumerate(names)}
        idx = [pos[j] for j in select]
    else:
        idx = list(range(per))
    if any(v.size < per for v in values.values()) or len(idx) != per:
        got = min(v.size for v in values.values())
        raise InputRejected("too_few_values", f"joint_states rejected: {got if not by_name else len(idx)} values "
                                              f"per field, the checkpoint's state_dim {state_dim} ({state_field}) "
                                              f"needs {per}")
    vec = np.concatenate([values[f][idx] for f in fields])
    with np.errstate(over="ignore"):
        vec32 = vec.astype(np.float32)
    if vec32.shape != (state_dim,):
        raise InputRejected("wrong_size", f"joint_states rejected: state has {vec32.size} values, the checkpoint "
                                          f"needs {state_dim}")
    if not np.isfinite(vec32).all():
        raise InputRejected("non_finite", "joint_states rejected: contains NaN or Inf (or a value beyond float32)")
    return vec32, by_name
