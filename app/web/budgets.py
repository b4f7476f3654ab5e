"""Per-user daily token budgets, checked against the usage the views hold.

``Budgeter.refusal(owner, model)`` reads the user's usage of the current UTC day (every
model together, and ``model``'s) from the views once they include the whole log (written by
any process sharing the database), and returns the ``QuotaExceededError`` that refuses a new
message when a configured budget is used up (None otherwise). ``Admission`` asks it before
anything is recorded. A message is admitted while the recorded usage is under the budget, so
what passes the budget is what the responses running when it was reached use: one turn's,
for a user who sends one message at a time, on any number of servers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from ..configfile import Budgets
from ..projections.views import Views
from .errors import QuotaExceededError

#: Longest wait for the views to include the log before the usage is read as it is.
CATCH_UP_S = 2.0


class Budgeter:
    def __init__(
        self,
        budgets: Budgets,
        views: Views,
        log_end: Callable[[], Awaitable[int]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.budgets = budgets
        self.views = views
        self.log_end = log_end
        self.clock = clock

    def applies(self, owner: str, model: str | None = None) -> bool:
        """``owner`` has a budget that a message (to ``model``, if known) counts against."""
        budget = self.budgets.of(owner)
        if model is None:
            return budget.limited
        return budget.daily_tokens is not None or budget.for_model(model) is not None

    def per_model(self, owner: str) -> bool:
        """``owner`` has budgets per model (the model a message goes to matters)."""
        return bool(self.budgets.of(owner).models)

    async def refusal(self, owner: str, model: str) -> QuotaExceededError | None:
        """The refusal of a new message of ``owner`` to ``model``, or None if it is within
        budget. Raises ``ViewStoreError`` / ``StoreError`` when the stores do not answer."""
        budget = self.budgets.of(owner)
        model_limit = budget.for_model(model)
        if budget.daily_tokens is None and model_limit is None:
            return None
        await self.views.wait_for(await self.log_end(), CATCH_UP_S)
        now = self.clock()
        today = now.date().isoformat()
        rows = [r for r in await self.views.usage(owner, since=today) if r["day"] == today]
        used = sum(r["total_tokens"] for r in rows)
        used_by_model = sum(r["total_tokens"] for r in rows if r["model"] == model)
        reset = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
        if budget.daily_tokens is not None and used >= budget.daily_tokens:
            return QuotaExceededError(
                f"the daily budget of {budget.daily_tokens} tokens is used up ({used} used"
                " today)", reset, now)
        if model_limit is not None and used_by_model >= model_limit:
            return QuotaExceededError(
                f"the daily budget of {model_limit} tokens for {model} is used up"
                f" ({used_by_model} used today)", reset, now)
        return None
