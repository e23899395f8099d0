"""Per-server limits on what one request may ask for: prompt length, steps, edits, schedule size.

The library keeps hard limits of its own (tokenflow.specs: a value beyond them is invalid anywhere and
answers INVALID_ARGUMENT). A server may only tighten them, with the serve flags ``--max-prompt-chars``,
``--max-steps``, ``--max-edits-per-request`` and ``--max-schedule-entries``. A value within the
library's limit but above this server's is this server's quota -- another server may accept it -- so it
answers like the decode limits do: a `TooLargeError` (RESOURCE_EXHAUSTED, INPUT_TOO_LARGE, no
RetryInfo), whose `limit_name` and `limit` services.errors puts in the ErrorInfo metadata and a
QuotaFailure, and whose `field` names the request field.

Checked on the validated spec when a request arrives, before a queue slot is taken: by each stage for
its own spec, and by the Editor for the whole request before the inversion runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenflow.errors import TooLargeError
from tokenflow.specs import MAX_PROMPT_CHARS, MAX_SCHEDULE_ENTRIES, EditSpec, InversionSpec, spec_fields

MAX_EDITS = 64
"""Edits per Editor request, at most: enough for a prompt sweep; beyond it a caller splits the request."""
STEP_FIELDS: tuple[str, ...] = ("steps", "edit_steps")
"""The InversionSpec fields ``max_steps`` bounds (inversion steps S and editing steps T)."""
MAX_STEPS = int(min(f.doc.maximum for f in spec_fields(InversionSpec) if f.name in STEP_FIELDS))
"""The library's hard limit on steps: the smallest declared maximum of the step fields."""

HARD_LIMITS: dict[str, int] = {
    "max_prompt_chars": MAX_PROMPT_CHARS,
    "max_steps": MAX_STEPS,
    "max_edits_per_request": MAX_EDITS,
    "max_schedule_entries": MAX_SCHEDULE_ENTRIES,
}
"""Each limit's name (its field here, its flag with dashes) and the most a server may set it to."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RequestLimits:
    """This server's request limits; the defaults are the library's hard limits."""

    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_steps: int = MAX_STEPS
    max_edits_per_request: int = MAX_EDITS
    max_schedule_entries: int = MAX_SCHEDULE_ENTRIES

    def __post_init__(self) -> None:
        for name, hard in HARD_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hard:
                raise ValueError(
                    f"{flag(name)} must be in 1..{hard} (a server may only tighten the library's limit), "
                    f"got {value!r}"
                )

    def check_inversion(self, spec: InversionSpec, path: str = "inversion") -> None:
        """TooLargeError for a prompt or step count of a validated InversionSpec over this server's limit."""
        self._check_prompts(spec, path)
        for name in STEP_FIELDS:
            value = getattr(spec, name)
            if value > self.max_steps:
                self._refuse("max_steps", f"{path}.{name} is {value}", f"{path}.{name}")

    def check_edit(self, spec: EditSpec, path: str = "edit") -> None:
        """TooLargeError for a prompt or keyframe schedule of a validated EditSpec over this server's
        limit."""
        self._check_prompts(spec, path)
        if spec.keyframe_schedule is not None:
            entries = sum(len(row) for row in spec.keyframe_schedule)
            if entries > self.max_schedule_entries:
                name = f"{path}.keyframe_schedule"
                self._refuse("max_schedule_entries", f"{name} has {entries} entries", name)

    def check_edit_count(self, count: int) -> None:
        if count > self.max_edits_per_request:
            self._refuse(
                "max_edits_per_request", f"{count} edits in one request (split the request)", "edits"
            )

    def _check_prompts(self, spec: InversionSpec | EditSpec, path: str) -> None:
        """Every prompt field the caller set; a field's declared default (the negative prompt a caller
        did not send) is the server's own text, never held against the caller."""
        for f in spec_fields(type(spec)):
            text = getattr(spec, f.name)
            if f.doc.text and text != f.default and len(text) > self.max_prompt_chars:
                name = f"{path}.{f.name}"
                self._refuse("max_prompt_chars", f"{name} is {len(text)} characters", name)

    def _refuse(self, limit_name: str, what: str, field: str) -> None:
        limit = getattr(self, limit_name)
        raise TooLargeError(
            f"{what}; this server's limit is {limit} ({limit_name})",
            limit_name=limit_name,
            limit=limit,
            field=field,
        )


DEFAULT_REQUEST_LIMITS = RequestLimits()
