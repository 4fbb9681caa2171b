"""When to train, and whether a new model replaces the served one: pure decisions.

* **Due** (``training_due``): the nightly trains only when there is a reason to — no served
  model, a served model of another target or of a factors space the current fit is not
  aligned to, a model older than ``train.retrain_every_days`` (0: every run), or a catalogue
  or factor set that changed by more than ``train.retrain_change_fraction`` since it was
  trained.
* **Promotion** (``promote``): the new model becomes current (``models/LATEST``) only if its
  validation loss, on tonight's validation tracks, is not worse than the current model's on
  the *same* tracks by more than ``train.promotion_tolerance`` (relative).  A model that
  loses is kept under ``models/`` but not served.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Due:
    due: bool
    reason: str


def _changed(now: int | None, then: int | None) -> float | None:
    if now is None or not then:
        return None
    return abs(now - then) / then


def training_due(current: dict | None, *, target: str, space: str, every_days: float, change_fraction: float,
                 catalogue_tracks: int | None, factor_tracks: int | None, now: datetime | None = None) -> Due:
    """Whether the train stage should train tonight (see the module docstring).
    ``current``: the served model's meta (None: no model); ``space``: its
    :func:`deepcuts.cf.align.model_space` against the current factors."""
    if current is None:
        return Due(True, "no served model")
    model = current.get("model_id")
    if current.get("target") != target:
        return Due(True, f"served model {model} has target {current.get('target')!r}, train.target is {target!r}")
    if space == "other":
        return Due(True, f"served model {model} is in a factors space the current fit is not aligned to")
    if every_days <= 0:
        return Due(True, "train.retrain_every_days = 0: every run")
    created = current.get("created_at")
    try:
        age_days = ((now or datetime.now(timezone.utc)) - datetime.fromisoformat(created)).total_seconds() / 86400
    except (TypeError, ValueError):
        return Due(True, f"served model {model} has no creation time")
    if age_days >= every_days:
        return Due(True, f"served model {model} is {age_days:.1f} days old (train.retrain_every_days = {every_days:g})")
    seen = current.get("trained_on") or {}
    for what, now_n in (("catalogue_tracks", catalogue_tracks), ("factor_tracks", factor_tracks)):
        change = _changed(now_n, seen.get(what))
        if change is None and now_n is not None:
            return Due(True, f"served model {model} does not record its {what}")
        if change is not None and change > change_fraction:
            return Due(True, f"{what} changed by {100 * change:.1f} % since model {model} "
                             f"(train.retrain_change_fraction = {change_fraction:g})")
    return Due(False, f"not due: served model {model} is {age_days:.1f} days old and the catalogue and factors "
                      f"changed by at most {100 * change_fraction:g} % since")


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    decision: str            # "promoted" | "kept, not served"
    reason: str
    new_validation_loss: float
    current_model: str | None = None
    current_validation_loss: float | None = None

    def as_summary(self) -> dict:
        return {"decision": self.decision, "reason": self.reason,
                "new_validation_loss": round(self.new_validation_loss, 6),
                "current_model": self.current_model,
                "current_validation_loss": (None if self.current_validation_loss is None
                                            else round(self.current_validation_loss, 6))}


def comparable(current: dict | None, new: dict, space: str) -> str | None:
    """Why the served model cannot be scored on the new model's validation set (None: it can)."""
    if current is None:
        return "no served model"
    for key in ("target", "target_column", "n_mels", "n_outputs"):
        if current.get(key) != new.get(key):
            return f"served model differs in {key} ({current.get(key)!r} vs {new.get(key)!r})"
    if new.get("target") == "labels" and current.get("label_names") != new.get("label_names"):
        return "served model has other label names"
    if space == "other":
        return "served model is in a factors space the current fit is not aligned to"
    return None


def promote(new_loss: float, current_loss: float | None, tolerance: float, current_model: str | None,
            incomparable: str | None = None) -> Promotion:
    """The promotion decision (losses: lower is better, on the same validation tracks)."""
    if incomparable is not None or current_loss is None:
        return Promotion(True, "promoted", incomparable or "the served model has no validation loss here",
                         new_loss, current_model, current_loss)
    limit = current_loss * (1.0 + tolerance)
    if new_loss <= limit:
        return Promotion(True, "promoted", f"validation loss {new_loss:.5f} <= {current_loss:.5f} x (1 + {tolerance:g})",
                         new_loss, current_model, current_loss)
    return Promotion(False, "kept, not served",
                     f"validation loss {new_loss:.5f} > {current_loss:.5f} x (1 + {tolerance:g}) of served model "
                     f"{current_model}", new_loss, current_model, current_loss)
