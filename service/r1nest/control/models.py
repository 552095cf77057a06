"""The control plane's request and response bodies as pydantic models: its OpenAPI schema.

Requests are closed and strict: an unknown field, a number that is not finite, a string where a
number goes, a float or a boolean where a whole number goes are refused (400, the field named in
`param`). The ranges are the ledger's own (ledger/rules.py), so what the schema accepts the
store accepts too; the one thing a schema cannot say, that an expiry lies in the future, the
store checks (400).

Responses are written by the handlers as plain JSON (`StrictJSONResponse`); the models here
document them, and the schemathesis test holds every answer to them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from r1nest.ledger import rules

MAX_LIMIT = 1_000_000  # the largest per-key limit the API accepts (requests in flight or per minute)

Credits = Annotated[StrictInt, Field(ge=0, le=rules.MAX_CREDITS)]
Topup = Annotated[StrictInt, Field(ge=1, le=rules.MAX_CREDITS)]
ExpiresAt = Annotated[float, Field(gt=0, le=rules.MAX_EXPIRES_AT, description="unix seconds, in the future")]
MaxConcurrency = Annotated[
    StrictInt, Field(ge=1, le=min(MAX_LIMIT, rules.MAX_CONCURRENCY_LIMIT),
                     description="open requests at once; null: the deployment's default")
]
RateLimitRpm = Annotated[
    StrictInt, Field(ge=1, le=min(MAX_LIMIT, rules.MAX_RATE_LIMIT_RPM),
                     description="requests per minute; null: the deployment's default")
]
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class CreateKey(_Request):
    name: Annotated[StrictStr, Field(max_length=rules.MAX_NAME_CHARS)] = ""
    credits: Credits
    expires_at: ExpiresAt | None = None
    max_concurrency: MaxConcurrency | None = None
    rate_limit_rpm: RateLimitRpm | None = None


class TopupKey(_Request):
    credits: Topup


class KeyLimits(_Request):
    """Replaces both limits: a field left out is null (the deployment's default)."""

    max_concurrency: MaxConcurrency | None = None
    rate_limit_rpm: RateLimitRpm | None = None


# responses ------------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Response):
    """Every refusal: OpenAI's error shape."""

    error: ErrorDetail


class CreatedKey(_Response):
    id: KeyId
    key: str = Field(description="the key itself: shown once, kept nowhere")
    name: str
    remaining_credits: int
    max_concurrency: int | None
    rate_limit_rpm: int | None


class Key(_Response):
    id: KeyId
    name: str
    created_at: float
    expires_at: float | None
    revoked: bool
    remaining_credits: int
    max_concurrency: int | None
    rate_limit_rpm: int | None


class KeyList(_Response):
    object: Literal["list"]
    data: list[Key]


class Revoked(_Response):
    id: KeyId
    revoked: Literal[True]


class Balance(_Response):
    id: KeyId
    remaining_credits: int


class Posting(_Response):
    kind: Literal["grant", "topup", "reserve", "settle", "void"]
    credits: int
    at: float
    reservation_id: str | None
    note: str | None


class KeyPostings(_Response):
    id: KeyId
    remaining_credits: int
    postings: list[Posting] = Field(description="the latest postings, oldest first")


class UsageTotals(_Response):
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    credits: int


class UsageRow(UsageTotals):
    start: float
    start_iso: str


class UsageReport(_Response):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    object: Literal["usage"]
    key: str | None
    bucket: Literal["hour", "day"]
    since: float = Field(alias="from")
    until: float = Field(alias="to")
    data: list[UsageRow]
    totals: UsageTotals


class CreditsLeft(_Response):
    object: Literal["credits"]
    id: KeyId
    remaining_credits: int


__all__ = [
    "Balance", "CreateKey", "CreatedKey", "CreditsLeft", "ErrorBody", "Key", "KeyLimits", "KeyList",
    "KeyPostings", "MAX_LIMIT", "Revoked", "TopupKey", "UsageReport",
]
