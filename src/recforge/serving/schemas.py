"""Request and response bodies of the serving API (they make ``/openapi.json`` precise)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StringConstraints)

MAX_K = 1000
MAX_HISTORY_ITEMS = 2000
MAX_EXCLUDE = 1000
MAX_CATEGORIES = 100
MAX_EVENTS = 1000
MAX_ID_CHARS = 256
MAX_CANDIDATES = 5000
MAX_VALUE_CHARS = 1000
MAX_LIST_VALUES = 1000


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (no lone surrogates)") from None
    return text


def _integral(value):
    """JSON Schema counts 5.0 as an integer: accept integral numbers, refuse booleans."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**limits):  # noqa: N802 - reads as a type
    """A strict integer within ``limits`` that also takes integral floats (5.0)."""
    return Annotated[StrictInt, Field(**limits), BeforeValidator(_integral)]


#: seconds since the epoch (an event's, a history item's); JSON's largest exact integer at most
Timestamp = Int(ge=0, le=2**53 - 1)
Text = lambda n: Annotated[str, StringConstraints(min_length=1, max_length=n), AfterValidator(_utf8)]  # noqa: E731
IdText = Text(MAX_ID_CHARS)
#: integers beyond ±(2**53 - 1) lose precision in many JSON parsers (RFC 7493): send such ids as strings
IdInt = Int(ge=-(2**53 - 1), le=2**53 - 1)
#: a raw user or item id as the data gives it: an integer or a string (``5`` and ``"5"`` are one id)
RawId = Annotated[IdInt | IdText, Field(description="raw id as in the training data: an integer, or a string "
                                                    "(also for integers beyond ±(2^53 - 1))")]
#: an id in a response: as the data has it
OutId = Annotated[int | str, Field(description="raw id as in the training data")]
Category = Text(100)
K = Annotated[Int(ge=1, le=MAX_K), Field(description="number of items to return")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(BaseModel):
    item_id: OutId
    score: float


class RecommendationRequest(_Body):
    history: Annotated[list[RawId], Field(max_length=MAX_HISTORY_ITEMS)] = Field(
        default_factory=list, description="raw item ids, oldest first; unknown ids are ignored and listed back")
    k: K = 10
    exclude: Annotated[list[RawId], Field(max_length=MAX_EXCLUDE)] = Field(
        default_factory=list, description="raw item ids never to return")
    categories: Annotated[list[Category], Field(max_length=MAX_CATEGORIES)] | None = Field(
        default=None, description="allow-list of categories (the item table's category/genres column)")
    behaviors: Annotated[list[Text(32) | None], Field(max_length=MAX_HISTORY_ITEMS)] | None = Field(
        default=None, description="the behaviour of each history item (view, cart, buy...; null where unknown), "
                                  "read by multi-behaviour models")
    timestamps: Annotated[list[Timestamp], Field(max_length=MAX_HISTORY_ITEMS)] | None = Field(
        default=None, description="seconds since the epoch of each history item, read by models that use the time "
                                  "between events (CmnRec with chunk=gap); without them such a model falls back")
    exclude_seen: bool = Field(default=True, description="leave out the items of the history (for a multi-behaviour "
                                                         "model: those of its target behaviour only)")


class RecommendationResponse(BaseModel):
    user_id: str | None = None
    model: str
    items: list[ScoredItem]
    fallback: Literal["popularity"] | None = Field(
        default=None, description="'popularity' when the user or history is unknown to the model")
    unknown_items: list[OutId] = Field(default_factory=list, description="history item ids not in the catalogue")


class SimilarItemsResponse(BaseModel):
    item_id: OutId
    model: str
    method: Literal["cosine-item-vectors", "cosine-cooccurrence"]
    items: list[ScoredItem]


class Event(_Body):
    user_id: RawId
    item_id: RawId
    timestamp: Timestamp | None = Field(
        default=None, description="seconds since the epoch; the server's clock when left out")
    behavior: Text(32) | None = Field(default=None, description="e.g. view, click, cart, buy")


class EventsRequest(_Body):
    events: Annotated[list[Event], Field(min_length=1, max_length=MAX_EVENTS)]


class EventsResponse(BaseModel):
    accepted: int = Field(description="events written durably before this reply")
    unknown_items: list[OutId] = Field(
        default_factory=list, description="item ids not in the current catalogue (stored, not used for ranking)")


class ReloadRequest(_Body):
    path: Text(4096) = Field(description="folder of a serving artifact on the server's file system")


class ModelInfo(BaseModel):
    model: str
    artifact: str
    created: str | None = None
    format_version: int | None = None
    task: Literal["ranking", "ctr"] = "ranking"
    n_users: int | None = Field(default=None, description="users of a ranking model's catalogue")
    n_items: int | None = Field(default=None, description="items of a ranking model's catalogue")
    labels: list[str] | None = Field(default=None, description="what a CTR model predicts, one probability each")
    features: list[str] | None = Field(default=None, description="the features a CTR model scores rows by")
    ann: str
    similar_items: str
    category_column: str | None = None


class ReloadResponse(BaseModel):
    status: Literal["reloaded"]
    previous: ModelInfo
    current: ModelInfo
    load_seconds: float
    generation: int = Field(description="number of the served model in the event log's sequence of models")
    workers: int = Field(description="worker processes serving the new model when this answer was sent (all)")


class WorkerInfo(BaseModel):
    pid: int = Field(description="process id of the worker that answered")
    generation: int = Field(description="model generation this worker serves")


class Health(BaseModel):
    status: Literal["ok"]
    uptime_seconds: float
    model: ModelInfo
    worker: WorkerInfo


#: one feature value: a category (string or number), a number, null (missing), or a list of values
Scalar = StrictInt | StrictFloat | StrictBool | Text(MAX_VALUE_CHARS) | None
FeatureValue = Annotated[Scalar | Annotated[list[Scalar], Field(max_length=MAX_LIST_VALUES)],
                         Field(description="a category, a number, null (missing), or a list for a multi-valued field")]
FeatureRow = dict[Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)], FeatureValue]


class ScoreRequest(_Body):
    user_id: RawId | None = Field(default=None, description="the user, put in the model's user column")
    context: FeatureRow = Field(default_factory=dict, description="features shared by every candidate")
    candidates: Annotated[list[FeatureRow], Field(min_length=1, max_length=MAX_CANDIDATES)] = Field(
        description="one feature row each (a value here wins over the context's)")
    unseen: Literal["oov", "error"] = Field(
        default="oov", description="values never seen in training: score as out-of-vocabulary (and list them), "
                                   "or refuse the request")


class UnseenValues(BaseModel):
    count: int
    examples: list[str]


class ScoreResponse(BaseModel):
    model: str
    user_id: str | None = None
    labels: list[str]
    scores: list[dict[str, float]] = Field(description="per candidate, in the request's order: label -> probability")
    unseen: dict[str, UnseenValues] = Field(
        default_factory=dict, description="per feature, values never seen in training, scored as out-of-vocabulary")


class ErrorBody(BaseModel):
    detail: str
