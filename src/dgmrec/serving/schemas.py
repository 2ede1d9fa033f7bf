"""Request and response bodies of the HTTP service (pydantic models; they make ``/openapi.json``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

#: most items or interactions one request may carry
MAX_BATCH = 1000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(BaseModel):
    """A rejected request: what is wrong, and the field, parameter or id it concerns."""

    detail: str = Field(description="One line naming the field and the problem.")
    field: str | None = Field(None, description="The field, query parameter or path parameter at fault.")


class Recommendation(BaseModel):
    item: str = Field(description="Raw item id.")
    score: float
    rank: int = Field(ge=1)


class Recommendations(BaseModel):
    user: str
    k: int
    exclude: Literal["seen", "train", "none"]
    source: Literal["model", "content", "popularity"] = Field(
        description="model: a trained user scored by the model; content: a user first seen in feedback, scored by "
                    "the mean final representation of their items; popularity: such a user without one.")
    items: list[Recommendation]


class SimilarItem(BaseModel):
    item: str
    score: float = Field(description="Cosine similarity.")


class SimilarItems(BaseModel):
    item: str
    space: str = Field(description="'final' (the model's item representation) or the modality searched.")
    items: list[SimilarItem]


class NewItem(_Body):
    """An item to add: an optional id and, for each modality it has, a feature vector or raw content (leave a
    modality out, or send null, when the item lacks it)."""

    id: str | None = Field(None, min_length=1, max_length=256,
                           description="Raw id; default: the item's internal index as a string.")
    features: dict[str, list[FiniteFloat] | None] = Field(
        default_factory=dict,
        description="Modality -> feature vector (the dataset's feature width); missing modalities are generated.")
    content: dict[str, str | None] = Field(
        default_factory=dict,
        description="Modality -> raw content, encoded as the run's dataset was built: a text for a modality built "
                    "from texts; a file's bytes in base64 (e.g. a JPEG or PNG image, also as a data: URL) for one "
                    "built from files. Needs a dataset folder written by `dgmrec dataset build` and the "
                    "`features` extra.")


class AddItemsRequest(_Body):
    items: list[NewItem] = Field(min_length=1, max_length=MAX_BATCH)


class AddedItem(BaseModel):
    id: str
    observed: list[str] = Field(description="Modalities the request gave.")
    generated: list[str] = Field(description="Missing modalities the model generated (DGMRec).")
    imputed: list[str] = Field(description="Missing modalities imputed (models that do not generate).")


class AddItemsResponse(BaseModel):
    items: list[AddedItem]


class Interaction(_Body):
    user: str = Field(min_length=1, max_length=256, description="Raw user id; an unknown one makes a new user.")
    item: str = Field(min_length=1, max_length=256, description="Raw id of a known or added item.")
    timestamp: FiniteFloat | None = Field(None, description="Seconds since the epoch; default: arrival time.")


class FeedbackRequest(_Body):
    interactions: list[Interaction] = Field(min_length=1, max_length=MAX_BATCH)


class FeedbackResponse(BaseModel):
    stored: int
    new_users: list[str] = Field(description="Users first seen in this request.")


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    modalities: list[str]
    users: int = Field(description="Users of the trained run.")
    new_users: int = Field(description="Users first seen in feedback.")
    items: int = Field(description="Items of the trained run.")
    added_items: int
    feedback: int
    version: int = Field(description="Number of writes since the service started (added items, feedback).")
    uptime_s: float


class RouteMetrics(BaseModel):
    count: int
    errors_4xx: int
    errors_5xx: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


class Metrics(BaseModel):
    routes: dict[str, RouteMetrics] = Field(description="'METHOD /path/template' -> counts and latencies "
                                                        "(percentiles over the last 10,000 requests).")
