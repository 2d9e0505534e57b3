"""Lists of message items as OpenAI pages them: `limit` (1-100, 20 by default), `order`
(`desc` by default, or `asc`) and `after` (an item's id), answered as `{"object": "list",
"data", "first_id", "last_id", "has_more"}`."""

from .errors import OpenAIError
from .ids import parse_id
from .response_objects import message_item


def item_list(request, messages) -> dict:
    """A page of `messages` (a queryset) as items, by the request's query parameters."""
    query = request.query_params
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise OpenAIError("limit is a number from 1 to 100.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise OpenAIError("order is 'asc' or 'desc'.", param="order")
    messages = messages.order_by("created_at" if order == "asc" else "-created_at")
    if after := query.get("after"):
        anchor = messages.filter(pk=parse_id(after, "msg", "after")).first()
        if anchor is None:
            raise OpenAIError(f"No item '{after}' here.", status_code=404, param="after")
        if order == "asc":
            messages = messages.filter(created_at__gt=anchor.created_at)
        else:
            messages = messages.filter(created_at__lt=anchor.created_at)
    page = list(messages[: limit + 1])
    data = [message_item(message) for message in page[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(page) > limit,
    }
