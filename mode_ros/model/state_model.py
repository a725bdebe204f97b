"""Predicting the state over the inference delay (ROS-free, numpy only).

A chunk planned from the observation at ``t`` lands ``d`` control ticks later; meanwhile the robot
executes ``d`` rows of the current plan, which the controller knows. Every row of the new chunk is then
at least ``d`` ticks older than the state it acts on, and the policy was trained to act on the state at
its row 0. :class:`StateModel` rolls the observed state forward over those ``d`` known rows, so the chunk
is planned from (a prediction of) the state at the tick it takes over, and executed from its row 0 there.

The model is linear, one control tick at a time, fitted by least squares on the training episodes
(robot units, the control rate of the data):

    s[t+1] - s[t] = [s[t], s[t] - s[t-1], a[t], 1] @ W

The state values whose ``horizon``-step prediction on held-out episodes is more than 10 % worse than
holding them constant (or that never change) are held; the others are predicted (``predicted``). On the
MT10 demonstrations the hand position after 5 ticks is predicted with 9-18 % of the error of holding it
(``docs/measurements/rtc/state_prediction``).

The trainer fits one for every policy with a state (``export/state_model.json``); ``mode-ros fit-state-model``
fits one for an existing checkpoint. The chunk controller uses it (``predict_state``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["StateModel", "StateModelError", "STATE_MODEL_FILE", "load_state_model"]

STATE_MODEL_FILE = "state_model.json"
FORMAT = "mode_ros.state_model/1"
# a value is predicted unless its held-out error is more than 10 % above holding it: values predicted about as
# well as held are still rolled forward with the others (one consistent state: on MT10 peg-insert-side and
# door-open, 0.875 success at d = 5 against 0.825 when only the clearly better ones were predicted)
_WORSE = 1.1
_MAX_EVAL = 5000  # held-out start ticks evaluated (evenly strided)


class StateModelError(ValueError):
    """A state model that cannot be fitted, read or used with this policy (the message says why)."""


def _features(s: np.ndarray, s_prev: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.concatenate([s, s - s_prev, a, np.ones(s.shape[:-1] + (1,))], axis=-1)


def _transitions(runs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Features and state changes of every tick with a tick before and after it in its run."""
    xs, ys = [], []
    for s, a in runs:
        if len(s) >= 3:
            xs.append(_features(s[1:-1], s[:-2], a[1:-1]))
            ys.append(s[2:] - s[1:-1])
    if not xs:
        raise StateModelError("state model: no run of 3 or more contiguous ticks to fit on")
    return np.concatenate(xs), np.concatenate(ys)


@dataclass
class StateModel:
    weights: np.ndarray          # (2 S + A + 1, S)
    predicted: np.ndarray        # (S,) bool: values rolled forward; the others are held
    action_low: np.ndarray       # (A,) the actions seen in fitting: rows are clipped to them
    action_high: np.ndarray
    report: dict = field(default_factory=dict)

    @property
    def state_dim(self) -> int:
        return int(self.predicted.shape[0])

    @property
    def action_dim(self) -> int:
        return int(self.action_low.shape[0])

    # ---- use --------------------------------------------------------------------------------------
    def predict(self, state, prev_state, actions) -> np.ndarray:
        """The state after executing ``actions`` (n, A) from ``state`` (the tick before: ``prev_state``),
        float32 (n = 0: ``state`` unchanged)."""
        s = np.asarray(state, dtype=np.float64).copy()
        sp = np.asarray(prev_state, dtype=np.float64)
        rows = np.asarray(actions, dtype=np.float64).reshape(-1, self.action_dim)
        if s.shape != (self.state_dim,) or sp.shape != s.shape:
            raise StateModelError(f"state model: states of {s.size} and {sp.size} values, the model has "
                                  f"{self.state_dim}")
        for a in np.clip(rows, self.action_low, self.action_high):
            nxt = s + np.where(self.predicted, _features(s, sp, a) @ self.weights, 0.0)
            sp, s = s, nxt
        return s.astype(np.float32)

    # ---- fitting -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, runs: Iterable[tuple[np.ndarray, np.ndarray]], horizon: int = 5, holdout: float = 0.2,
            seed: int = 0) -> "StateModel":
        """Fit on ``runs`` of (states (T, S), actions (T, A)) at the control rate, contiguous in time.
        A deterministic ``holdout`` share of the runs decides which values are predicted (their
        ``horizon``-tick error against holding them); the weights are then refitted on every run."""
        runs = [(np.asarray(s, np.float64), np.asarray(a, np.float64)) for s, a in runs]
        if not runs:
            raise StateModelError("state model: no episodes with a state to fit on")
        order = np.random.default_rng(seed).permutation(len(runs))
        n_out = int(round(holdout * len(runs))) if len(runs) >= 5 else 0
        held, train = [runs[i] for i in order[:n_out]], [runs[i] for i in order[n_out:]]
        acts = np.concatenate([a for _, a in runs])
        lo, hi = acts.min(axis=0), acts.max(axis=0)
        x, y = _transitions(train)
        trial = cls(np.linalg.lstsq(x, y, rcond=None)[0], np.ones(y.shape[1], bool), lo, hi)
        model_err, hold_err = trial._errors(held or train, horizon)
        ratio = np.where(hold_err > 0, model_err / np.maximum(hold_err, 1e-12), np.inf)
        x, y = _transitions(runs)
        report = {"transitions": int(len(x)), "runs": len(runs), "heldout_runs": n_out, "horizon": int(horizon),
                  "error_ratio": [None if not np.isfinite(r) else round(float(r), 4) for r in ratio],
                  "heldout_error": [round(float(e), 6) for e in model_err],
                  "hold_error": [round(float(e), 6) for e in hold_err]}
        return cls(np.linalg.lstsq(x, y, rcond=None)[0], ratio <= _WORSE, lo, hi, report)

    def _errors(self, runs, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean |error| per value after ``horizon`` ticks: this model's, and holding the state's."""
        model, hold = [], []
        starts = [(i, t) for i, (s, _) in enumerate(runs) for t in range(1, len(s) - horizon)]
        for i, t in starts[::max(1, len(starts) // _MAX_EVAL)]:
            s, a = runs[i]
            model.append(np.abs(self.predict(s[t], s[t - 1], a[t:t + horizon]) - s[t + horizon]))
            hold.append(np.abs(s[t] - s[t + horizon]))
        if not model:
            raise StateModelError(f"state model: no run longer than horizon + 1 = {horizon + 1} ticks")
        return np.mean(model, axis=0), np.mean(hold, axis=0)

    # ---- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "state_dim": self.state_dim, "action_dim": self.action_dim,
                "weights": self.weights.tolist(), "predicted": self.predicted.astype(bool).tolist(),
                "action_low": self.action_low.tolist(), "action_high": self.action_high.tolist(),
                "report": self.report}

    @classmethod
    def from_dict(cls, d: dict) -> "StateModel":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StateModelError(f"not a state model (format {FORMAT!r} expected)")
        try:
            s, a = int(d["state_dim"]), int(d["action_dim"])
            w = np.asarray(d["weights"], np.float64)
            m = cls(w, np.asarray(d["predicted"], bool), np.asarray(d["action_low"], np.float64),
                    np.asarray(d["action_high"], np.float64), dict(d.get("report") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateModelError(f"state model: malformed ({type(exc).__name__}: {exc})") from None
        if w.shape != (2 * s + a + 1, s) or m.predicted.shape != (s,) or m.action_low.shape != (a,) \
                or m.action_high.shape != (a,) or not np.isfinite(w).all():
            raise StateModelError(f"state model: weights {w.shape} do not fit state_dim {s}, action_dim {a} "
                                  "(or are not finite)")
        return m

    def save(self, folder: str | os.PathLike) -> Path:
        """Written atomically as ``folder/state_model.json``."""
        path = Path(folder) / STATE_MODEL_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)
        return path


def load_state_model(folder: str | os.PathLike, state_dim: int, action_dim: int) -> StateModel | None:
    """The checkpoint's state model (None when it has none); a file that does not fit the policy's state
    and action sizes is a :class:`StateModelError` naming it."""
    path = Path(folder) / STATE_MODEL_FILE
    if not path.is_file():
        return None
    try:
        model = StateModel.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, StateModelError) as exc:
        raise StateModelError(f"{path}: {exc}") from None
    if (model.state_dim, model.action_dim) != (int(state_dim), int(action_dim)):
        raise StateModelError(f"{path}: state model for state_dim {model.state_dim}, action_dim {model.action_dim}; "
                              f"the policy has {state_dim}, {action_dim}")
    return model
