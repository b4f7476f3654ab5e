"""``GET /models`` (the models this server reaches) and ``GET /usage`` (the caller's tokens
per UTC day and model, from the views' usage projection)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field
from quart import Blueprint, current_app
from quart_schema import validate_querystring

from . import schemas as s
from .auth import current_user
from .rest import documented
from .services import Services

catalog = Blueprint("catalog", __name__)


class UsageQuery(BaseModel):
    #: How many UTC days back, today included.
    days: int = Field(30, ge=1, le=366)


def services() -> Services:
    return current_app.extensions["eventchat"]  # type: ignore[no-any-return]


@catalog.get("/models")
@documented(s.ModelList)
async def models() -> dict[str, object]:
    """The models this server is configured to reach; ``default`` answers chats naming none."""
    settings = services().settings
    default = settings.default_model
    return {"models": [{"id": m, "provider": u.name, "default": m == default}
                       for u in settings.catalog() for m in u.models]}


@catalog.get("/usage")
@validate_querystring(UsageQuery)
@documented(s.UsagePage)
async def usage(query_args: UsageQuery) -> dict[str, object]:
    """The caller's tokens per UTC day and model over the last ``days`` days, and the
    budgets that apply to them."""
    owner, svc = current_user(), services()
    await svc.caught_up()
    today = datetime.now(UTC).date()
    since = (today - timedelta(days=query_args.days - 1)).isoformat()
    rows = await svc.views.usage(owner, since=since)
    budget = svc.settings.budgets.of(owner)
    return {"usage": rows,
            "budget": {"daily_tokens": budget.daily_tokens, "models": dict(budget.models),
                       "resets_at": datetime.combine(today + timedelta(days=1),
                                                     datetime.min.time(), UTC)
                       .isoformat(timespec="seconds")}}
