"""Base class for every wire model: strict, and failing with TenSafe's ``ValidationError``."""

from __future__ import annotations

from typing import Any

import pydantic

from .errors import MalformedRequestError, ValidationError


MAX_REPORTED_ERRORS = 10  # a body with a million bad values gets ten described, not a million (and no input)


def describe_pydantic_error(exc: pydantic.ValidationError, model: str) -> ValidationError:
    errors = exc.errors(include_input=False, include_url=False)
    problems = []
    for err in errors[:MAX_REPORTED_ERRORS]:
        original = (err.get("ctx") or {}).get("error")
        if isinstance(original, ValidationError) and len(errors) == 1:
            return original  # already described by a nested model
        field = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        message = str(original) if original is not None else err.get("msg", "invalid")
        problems.append({"field": field, "problem": message[:500]})
    return validation_error(f"invalid {model}", problems, len(errors))


def malformed_json() -> MalformedRequestError:
    """Not a JSON document, or one nested deeper than a parser follows: the same 400 on both doors."""
    return MalformedRequestError("the request body is not a JSON document (or is nested too deep)")


def validation_error(what: str, problems: list[dict], count: int) -> ValidationError:
    """One ValidationError for ``count`` problems, of which ``problems`` (at most MAX_REPORTED_ERRORS) are
    described: the trainer's own refusals and FastAPI's say it the same way."""
    text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    if count > len(problems):
        text += f"; and {count - len(problems)} more"
    return ValidationError(f"{what}: {text}", {"errors": problems, "error_count": count})


class WireModel(pydantic.BaseModel):
    """Unknown fields are refused; invalid values raise ``tg_tinker.ValidationError`` naming the field."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise describe_pydantic_error(exc, type(self).__name__) from None

    @classmethod
    def parse_json(cls, raw: bytes | str):
        """Validate a JSON document into this model, raising TenSafe's ``ValidationError``."""
        try:
            return cls.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors(include_input=False, include_url=False)):
                raise malformed_json() from None
            raise describe_pydantic_error(exc, cls.__name__) from None

    @classmethod
    def parse(cls, data: Any):
        """Validate wire data (a dict) into this model, raising TenSafe's ``ValidationError``."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            raise describe_pydantic_error(exc, cls.__name__) from None
