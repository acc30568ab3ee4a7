"""pydantic's validation errors in OpenAI's words (the error types and OpenAI's error body are in omniserve.errors,
shared with the Batch API and the router)."""

from __future__ import annotations


def validation_message(errors: list[dict], skip: int = 0) -> tuple[str, str | None]:
    """pydantic's errors as one message naming each field, and the first field (the error's `param`); `skip` drops
    that many leading parts of each location."""
    parts, param = [], None
    for error in errors:
        field = ".".join(str(p) for p in error.get("loc", ())[skip:])
        param = param or field or None
        if error.get("type") == "extra_forbidden":  # OpenAI's words for a field it does not know
            parts.append(f"Unrecognized request argument supplied: {field}")
        else:
            parts.append(f"{field}: {error.get('msg')}" if field else str(error.get("msg")))
    return "; ".join(parts) or "invalid request", param
