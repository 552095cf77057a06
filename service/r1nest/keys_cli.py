"""`r1nest keys`: create, list, revoke and top up API keys, and set their limits.

One set of commands, two ways to reach the keys:
- the local store (default): the ledger the settings name (SQLite in `--data-dir`, or the
  DynamoDB table), opened directly; safe next to a running gateway (SQLite in WAL mode waits for
  the gateway's lock; DynamoDB uses transactions);
- `--url URL`: a running gateway's admin API (`/admin/keys`), authenticated with the admin key
  from R1NEST_ADMIN_KEY, `--admin-key`, or the one stored in the data dir.

A key's plaintext is printed once, by `create`; nothing else ever shows it (or its hash).

`r1nest usage` (usage_cli.py) reaches the same two places through `key_admin` and `run_admin`.

Errors are one line on stderr and exit 1 (`r1nest.cli.main`), never a traceback: a store that
cannot answer now (locked past its busy timeout, unreachable, throttled; a gateway answering
503) is StoreUnavailable, "the key store cannot be reached now ...; retry shortly"; refused
input is InvalidLedgerArgument or a usage error (exit 2).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import click

from r1nest import accounts
from r1nest.errors import ConfigError, InvalidLedgerArgument, R1nestError, StoreUnavailable, UnknownKey
from r1nest.keys import parse_key_id
from r1nest.ledger.base import Store
from r1nest.ledger.rules import (
    MAX_CONCURRENCY_LIMIT,
    MAX_CREDITS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_NAME_CHARS,
    MAX_RATE_LIMIT_RPM,
)
from r1nest.settings import load_settings
from r1nest.usage import Window, usage_json

HTTP_TIMEOUT_S = 15.0
MAX_EXPIRY_DAYS = 36_500.0
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_IDEMPOTENCY_KEY = re.compile(rf"^[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}$")  # visible ASCII
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}

T = TypeVar("T")


class _Explained(StoreUnavailable):
    """A StoreUnavailable already worded for the user."""


def _unavailable(exc: StoreUnavailable) -> StoreUnavailable:
    if isinstance(exc, _Explained):
        return exc
    return _Explained(f"the key store cannot be reached now ({exc}); retry shortly")


class KeyAdmin(Protocol):
    """What the commands need; answers have the admin API's JSON shapes."""

    async def create(
        self, *, name: str, credits: int, expires_at: float | None,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> dict[str, Any]: ...

    async def list(self) -> list[dict[str, Any]]: ...

    async def get(self, key_id: str) -> dict[str, Any]: ...  # UnknownKey

    async def set_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> dict[str, Any]: ...

    async def usage(self, window: Window, *, key_id: str | None) -> dict[str, Any]: ...  # usage_json

    async def revoke(self, key_id: str) -> dict[str, Any]: ...

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class LocalKeys:
    """The store itself, as this machine's settings name it."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def create(
        self, *, name: str, credits: int, expires_at: float | None,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> dict[str, Any]:
        from r1nest.accounts import create_api_key

        record, plaintext = await create_api_key(
            self._store, name=name, credits=credits, expires_at=expires_at, now=self._clock(),
            max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm,
        )
        return {"key": plaintext, **accounts.key_json(record)}

    async def list(self) -> list[dict[str, Any]]:
        return [accounts.key_json(record) for record in await self._store.list_keys()]

    async def get(self, key_id: str) -> dict[str, Any]:
        record = await self._store.get_key(key_id)
        if record is None:
            raise UnknownKey(f"no key with id {key_id}")
        return accounts.key_json(record)

    async def set_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> dict[str, Any]:
        record = await self._store.set_key_limits(
            key_id, max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm
        )
        return accounts.key_json(record)

    async def usage(self, window: Window, *, key_id: str | None) -> dict[str, Any]:
        if key_id is not None:
            await self.get(key_id)  # an unknown id is an error, not an empty table
        buckets = await self._store.usage(
            key_id=key_id, since=window.since, until=window.until, bucket_s=window.bucket_s
        )
        return usage_json(window, buckets, key_id=key_id)

    async def revoke(self, key_id: str) -> dict[str, Any]:
        record = await self._store.revoke_key(key_id)
        return {"id": record.key_id, "revoked": record.revoked}

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str) -> dict[str, Any]:
        balance = await self._store.topup(key_id, credits, idempotency_key=idempotency_key, now=self._clock())
        return {"id": key_id, "remaining_credits": balance}

    async def close(self) -> None:
        await self._store.close()


class RemoteKeys:
    """A gateway's admin API over HTTP(S)."""

    def __init__(self, url: str, admin_key: str, *, transport: Any = None) -> None:
        import httpx

        self._url = url.rstrip("/")
        self._httpx = httpx
        self._client = httpx.AsyncClient(
            base_url=self._url,
            headers={"Authorization": f"Bearer {admin_key}", "Accept": "application/json"},
            timeout=HTTP_TIMEOUT_S,
            transport=transport,
            follow_redirects=False,  # never replay the admin key to another address
        )

    async def create(
        self, *, name: str, credits: int, expires_at: float | None,
        max_concurrency: int | None = None, rate_limit_rpm: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "credits": credits}
        for field, value in (("expires_at", expires_at), ("max_concurrency", max_concurrency),
                             ("rate_limit_rpm", rate_limit_rpm)):
            if value is not None:
                body[field] = value
        return await self._call("POST", "/admin/keys", json=body)

    async def list(self) -> list[dict[str, Any]]:
        data = (await self._call("GET", "/admin/keys")).get("data")
        if not isinstance(data, list):
            raise R1nestError(f"{self._url} answered GET /admin/keys without a `data` list")
        return data

    async def get(self, key_id: str) -> dict[str, Any]:
        for entry in await self.list():
            if isinstance(entry, dict) and entry.get("id") == key_id:
                return entry
        raise UnknownKey(f"no key with id {key_id}")

    async def set_limits(
        self, key_id: str, *, max_concurrency: int | None, rate_limit_rpm: int | None
    ) -> dict[str, Any]:
        return await self._call(
            "POST", f"/admin/keys/{key_id}/limits", key_id=key_id,
            json={"max_concurrency": max_concurrency, "rate_limit_rpm": rate_limit_rpm},
        )

    async def usage(self, window: Window, *, key_id: str | None) -> dict[str, Any]:
        params = {"from": f"{window.since:.3f}", "to": f"{window.until:.3f}", "bucket": window.bucket}
        if key_id is not None:
            params["key"] = key_id
        return await self._call("GET", "/admin/usage", key_id=key_id, params=params)

    async def revoke(self, key_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/admin/keys/{key_id}/revoke", key_id=key_id)

    async def topup(self, key_id: str, credits: int, *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(
            "POST", f"/admin/keys/{key_id}/topup", key_id=key_id,
            json={"credits": credits}, headers={"Idempotency-Key": idempotency_key},
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, *, key_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._client.request(method, path, **kwargs)
        except self._httpx.TimeoutException:
            raise R1nestError(f"the gateway at {self._url} did not answer within {HTTP_TIMEOUT_S:.0f} s") from None
        except self._httpx.HTTPError as exc:
            raise R1nestError(f"cannot reach the gateway at {self._url}: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        message = _error_message(body)
        if response.status_code == 401:
            raise R1nestError(
                f"the gateway at {self._url} refused the admin key (401); set R1NEST_ADMIN_KEY to its admin key"
            )
        if response.status_code == 404:
            if key_id is not None and _error_code(body) == "key_not_found":
                raise UnknownKey(f"no key with id {key_id}")
            raise R1nestError(f"{method} {path}: not found at {self._url} (404); is this an r1nest gateway?")
        detail = f": {message}" if message else ""
        if response.status_code == 503:
            retry = response.headers.get("retry-after")
            when = f"retry in {retry} s" if retry and retry.isdigit() else "retry shortly"
            raise _Explained(f"the gateway at {self._url} cannot answer {method} {path} now (503){detail}; {when}")
        if response.status_code == 400:
            raise InvalidLedgerArgument(f"the gateway refused {method} {path} (400){detail}")
        if response.status_code >= 400:
            raise R1nestError(f"the gateway refused {method} {path} ({response.status_code}){detail}")
        if not isinstance(body, dict):
            raise R1nestError(f"{self._url} answered {method} {path} with something other than a JSON object")
        return body


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:500]
    return ""


def _error_code(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", ""))
    return ""


# plumbing shared by the commands -----------------------------------------------------------


def key_admin(data_dir: Path | None, url: str | None, admin_key: str | None) -> KeyAdmin:
    settings = load_settings(data_dir=data_dir, admin_key=admin_key)
    if url is None:
        from r1nest.ledger import open_store

        try:
            return LocalKeys(open_store(settings))
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url must be an http(s) URL such as https://gateway.example.com, got {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("--url must be a plain base URL (no credentials, query or fragment)")
    from r1nest.accounts import read_admin_key

    key = read_admin_key(settings)
    if key is None:
        raise ConfigError(
            "the admin API needs the gateway's admin key: set R1NEST_ADMIN_KEY (or --admin-key)"
        )
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        click.echo(f"warning: sending the admin key over plain HTTP to {parts.hostname}", err=True)
    return RemoteKeys(url, key)


def run_admin(admin: KeyAdmin, action: Callable[[KeyAdmin], Awaitable[T]]) -> T:
    async def run() -> T:
        try:
            return await action(admin)
        finally:
            await admin.close()

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        raise _unavailable(exc) from None


def check_key_id(value: str) -> str:
    if _KEY_ID.match(value):
        return value
    if parse_key_id(value) is not None:
        # never echo what looks like a whole key
        raise click.BadParameter("pass the key's id (see `r1nest keys list`), not the key itself")
    raise click.BadParameter(f"{value!r} is not a key id (12 lowercase hex characters, see `r1nest keys list`)")


def format_when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    try:
        return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, ValueError, OSError):  # not a date a clock can show
        return repr(seconds)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def where_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--admin-key", help="The gateway's admin key for --url (prefer R1NEST_ADMIN_KEY: flags show in ps)."
    )(command)
    command = click.option(
        "--url", help="A running gateway's base URL: use its admin API instead of the local store."
    )(command)
    command = click.option(
        "--data-dir", type=click.Path(path_type=Path, file_okay=False),
        help="Where the local ledger and admin key live (default: the settings' data_dir).",
    )(command)
    return command


CREDITS = click.IntRange(0, MAX_CREDITS)
CONCURRENCY = click.IntRange(1, MAX_CONCURRENCY_LIMIT)
RPM = click.IntRange(1, MAX_RATE_LIMIT_RPM)


if TYPE_CHECKING:  # click is generic in its converted type from 8.4; at run time any 8.x will do
    _LimitParamType = click.ParamType[int | str]
else:
    _LimitParamType = click.ParamType


class LimitOrNone(_LimitParamType):
    """A per-key limit: a whole number in range, or `none` (no override: the deployment default)."""

    name = "N|none"

    def __init__(self, maximum: int) -> None:
        self._range = click.IntRange(1, maximum)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if value is CLEARED or (isinstance(value, str) and value.strip().lower() == "none"):
            return CLEARED
        return self._range.convert(value, param, ctx)


CLEARED = "none"  # what a LimitOrNone option gives for `none`


def format_limit(value: Any) -> str:
    """A key's limit as `keys list` shows it: the number, or "default" (the deployment's)."""
    return "default" if value is None else str(value)


# the commands ------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Create, list, revoke and top up API keys, and set their limits (local store, or a gateway
    with --url)."""


@keys.command()
@click.option("--credits", type=CREDITS, required=True, help="Initial balance, in credits.")
@click.option("--name", default="", help=f"A label for the key (at most {MAX_NAME_CHARS} characters).")
@click.option(
    "--expires-in", type=click.FloatRange(0, MAX_EXPIRY_DAYS, min_open=True), metavar="DAYS",
    help="The key stops working after this many days.",
)
@click.option(
    "--max-concurrency", type=CONCURRENCY, metavar="N",
    help="At most N requests of this key at once (default: the deployment's R1NEST_MAX_CONCURRENT_PER_KEY).",
)
@click.option(
    "--rate-limit-rpm", type=RPM, metavar="N",
    help="At most N requests of this key per minute (default: the deployment's R1NEST_RATE_LIMIT_RPM).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "key", "remaining_credits"}.')
@where_options
def create(
    credits: int, name: str, expires_in: float | None, max_concurrency: int | None, rate_limit_rpm: int | None,
    as_json: bool, data_dir: Path | None, url: str | None, admin_key: str | None,
) -> None:
    """Create a key. Its plaintext is printed once: store it now."""
    if len(name) > MAX_NAME_CHARS:
        raise click.BadParameter(f"at most {MAX_NAME_CHARS} characters", param_hint="--name")
    expires_at = time.time() + expires_in * 86_400 if expires_in is not None else None
    admin = key_admin(data_dir, url, admin_key)
    created = run_admin(admin, lambda a: a.create(
        name=name, credits=credits, expires_at=expires_at,
        max_concurrency=max_concurrency, rate_limit_rpm=rate_limit_rpm,
    ))
    if as_json:
        print_json({"id": created["id"], "key": created["key"], "remaining_credits": created["remaining_credits"]})
        return
    label = f" ({created['name']})" if created.get("name") else ""
    click.echo(f"Created key {created['id']}{label} with {created['remaining_credits']} credits.")
    if expires_at is not None:
        click.echo(f"It expires {format_when(expires_at)}.")
    if max_concurrency is not None or rate_limit_rpm is not None:
        limits = {"max_concurrency": max_concurrency, "rate_limit_rpm": rate_limit_rpm}
        click.echo(_limits_line(created["id"], limits))
    click.echo("API key (shown once; store it now):")
    click.echo(created["key"])


@keys.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the keys as JSON (never their secrets).")
@where_options
def list_keys(as_json: bool, data_dir: Path | None, url: str | None, admin_key: str | None) -> None:
    """List keys: id, name, credits, dates, status, limits. Secrets are never shown."""
    listed = run_admin(key_admin(data_dir, url, admin_key), lambda a: a.list())
    fields = (
        "id", "name", "created_at", "expires_at", "revoked", "remaining_credits",
        "max_concurrency", "rate_limit_rpm",
    )
    rows = [{field: entry.get(field) for field in fields} for entry in listed]
    if as_json:
        print_json({"data": rows})
        return
    if not rows:
        click.echo("No keys yet. Create one with: r1nest keys create --credits N")
        return
    now = time.time()
    table = [("ID", "NAME", "CREDITS", "CREATED", "EXPIRES", "STATUS", "CONCURRENCY", "RPM")]
    for row in rows:
        expired = row["expires_at"] is not None and row["expires_at"] <= now
        status = "revoked" if row["revoked"] else "expired" if expired else "active"
        table.append((
            str(row["id"]), str(row["name"] or "-"), str(row["remaining_credits"]),
            format_when(row["created_at"]), format_when(row["expires_at"]), status,
            format_limit(row["max_concurrency"]), format_limit(row["rate_limit_rpm"]),
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "revoked"}.')
@where_options
def revoke(key_id: str, as_json: bool, data_dir: Path | None, url: str | None, admin_key: str | None) -> None:
    """Revoke a key: it stops working at once (its open requests still settle)."""
    key_id = check_key_id(key_id)
    revoked = run_admin(key_admin(data_dir, url, admin_key), lambda a: a.revoke(key_id))
    if as_json:
        print_json({"id": revoked["id"], "revoked": revoked["revoked"]})
    else:
        click.echo(f"Revoked key {revoked['id']}.")


@keys.command()
@click.argument("key_id", metavar="ID")
@click.argument("credits", metavar="N", type=click.IntRange(1, MAX_CREDITS))
@click.option(
    "--idempotency-key", metavar="K",
    help="Names this top-up: retrying with the same K never adds twice (default: a new one, printed).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "remaining_credits", "idempotency_key"}.')
@where_options
def topup(
    key_id: str, credits: int, idempotency_key: str | None, as_json: bool,
    data_dir: Path | None, url: str | None, admin_key: str | None,
) -> None:
    """Add N credits to key ID, once per idempotency key."""
    key_id = check_key_id(key_id)
    if idempotency_key is None:
        idempotency_key = str(uuid.uuid4())
    elif not _IDEMPOTENCY_KEY.match(idempotency_key):
        raise click.BadParameter(
            f"1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters, no spaces",
            param_hint="--idempotency-key",
        )
    admin = key_admin(data_dir, url, admin_key)
    try:
        answer = run_admin(admin, lambda a: a.topup(key_id, credits, idempotency_key=idempotency_key))
    except (UnknownKey, InvalidLedgerArgument):
        raise  # refused: nothing was applied
    except R1nestError as exc:
        # the top-up may or may not have been applied: the key makes a retry safe
        hint = f"{exc} (retry safely with --idempotency-key {idempotency_key})"
        raise (_Explained(hint) if isinstance(exc, StoreUnavailable) else R1nestError(hint)) from None
    if as_json:
        print_json({"id": answer["id"], "remaining_credits": answer["remaining_credits"],
                     "idempotency_key": idempotency_key})
        return
    click.echo(f"Key {answer['id']} now has {answer['remaining_credits']} credits.")
    click.echo(f"Idempotency key: {idempotency_key} (reuse it to retry this top-up safely)")


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option(
    "--max-concurrency", type=LimitOrNone(MAX_CONCURRENCY_LIMIT), metavar="N|none",
    help="At most N requests of this key at once; `none`: the deployment's default.",
)
@click.option(
    "--rate-limit-rpm", type=LimitOrNone(MAX_RATE_LIMIT_RPM), metavar="N|none",
    help="At most N requests of this key per minute; `none`: the deployment's default.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "max_concurrency", "rate_limit_rpm"}.')
@where_options
def limits(
    key_id: str, max_concurrency: Any, rate_limit_rpm: Any, as_json: bool,
    data_dir: Path | None, url: str | None, admin_key: str | None,
) -> None:
    """Show or set key ID's limits. A limit not named keeps its value; without options, nothing
    changes. The gateway answers a request over a limit with 429 and Retry-After."""
    key_id = check_key_id(key_id)

    async def apply(admin: KeyAdmin) -> dict[str, Any]:
        current = await admin.get(key_id)
        if max_concurrency is None and rate_limit_rpm is None:
            return current
        return await admin.set_limits(
            key_id,
            max_concurrency=_new_limit(max_concurrency, current.get("max_concurrency")),
            rate_limit_rpm=_new_limit(rate_limit_rpm, current.get("rate_limit_rpm")),
        )

    answer = run_admin(key_admin(data_dir, url, admin_key), apply)
    shown = {"id": answer.get("id", key_id), "max_concurrency": answer.get("max_concurrency"),
             "rate_limit_rpm": answer.get("rate_limit_rpm")}
    if as_json:
        print_json(shown)
    else:
        click.echo(_limits_line(key_id, shown))


def _new_limit(given: Any, current: Any) -> int | None:
    if given is None:  # not named: keep
        return current if isinstance(current, int) and not isinstance(current, bool) else None
    return None if given == CLEARED else int(given)


def _limits_line(key_id: str, limits: dict[str, Any]) -> str:
    concurrency, rpm = limits.get("max_concurrency"), limits.get("rate_limit_rpm")
    at_once = f"at most {concurrency} requests at once"
    per_minute = f"at most {rpm} requests per minute"
    if concurrency is None:
        at_once = "concurrency: the deployment's default"
    if rpm is None:
        per_minute = "rate: the deployment's default"
    return f"Key {key_id}: {at_once}; {per_minute}."
