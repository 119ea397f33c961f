"""The chain registry source: a crunch's identities read from Solana over JSON-RPC.

`ChainRegistry` is a `smp.registry.RegistrySource`, like the file adapter: `current()`
hands over the last good `RegistrySnapshot` and never does I/O. A background thread
(`start()`) refreshes it every `refresh_interval_seconds` (at most 1 s, the file adapter's
bound) with commitment `finalized`; `refresh()` does one refresh in the caller's thread.
A failed refresh keeps the last good snapshot, whose `fetched_at` then stops advancing,
so once it is older than the verifier's `max_registry_age_seconds` every call and every
delegation check is refused with REGISTRY_STALE (`smp.rules.current_registry`, SMP-4b):
the chain adapter fails closed exactly like the file adapter. The failure is logged,
reported once to `on_failure` (for an audit line and health), and `healthy` turns False.

One refresh, each step a single RPC (later reads ask for at least the first read's slot,
`minContextSlot`, so one refresh never mixes an older chain state into a newer one):
  1. `getMultipleAccounts`: the coordinator accounts the configuration lists;
  2. `getMultipleAccounts`: each coordinator's certificate account (PDA of its owner);
  3. `getProgramAccounts`: the model accounts of this crunch (filtered by discriminator
     and crunch address);
  4. `getMultipleAccounts`: the cruncher account (PDA of the wallet) of each model.
The accounts are then decoded and checked (`solana_accounts`) and mapped (`mapping`).

HTTP client: httpx (maintained; one pooled keep-alive connection for the 1 s refreshes,
connect/read/write/pool timeouts, and exception classes that tell a timeout from a refused
connection). Only typed `ConfigError`s leave this module: CHAIN_RPC_UNREACHABLE,
CHAIN_RPC_TIMEOUT, CHAIN_RPC_RATE_LIMITED (HTTP 429: the refresh loop then waits for the
server's Retry-After, at most 30 s) and CHAIN_RPC_ERROR (any other HTTP status, a JSON-RPC
error, an answer over `max_response_bytes` or not of the documented shape); a bug in a
refresh is logged with its traceback and typed REGISTRY_UNAVAILABLE, so the refresh thread
never dies (SECURITY.md CH-6, CH-7).
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from secure_runner.errors import ConfigError, ErrorCode
from secure_runner.registry import mapping
from secure_runner.registry.solana_accounts import (
    MODEL_CRUNCH_OFFSET,
    Address,
    ChainAccountsConfig,
    RawAccount,
    address_text,
    decode_certificate,
    decode_coordinator,
    decode_cruncher,
    decode_model,
    pubkey_bytes,
)
from secure_runner.smp.identity import validate_id
from secure_runner.smp.registry import RegistrySnapshot

log = logging.getLogger(__name__)

COMMITMENT = "finalized"
MAX_ACCOUNTS_PER_CALL = 100  # getMultipleAccounts' documented limit
MAX_RATE_LIMIT_WAIT_SECONDS = 30.0


class ChainRegistryConfig(BaseModel):
    """Everything the chain adapter needs; every limit is a field here, each checked (CH-8)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpc_url: str = Field(description="Solana JSON-RPC endpoint, http(s)://")
    crunch_id: str = Field(description="this crunch's id in the registry (and in SPIFFE ids)")
    crunch_address: Address = Field(description="base58 address of the crunch on chain (model accounts name it)")
    coordinators: list[Address] = Field(
        min_length=1, max_length=MAX_ACCOUNTS_PER_CALL, description="base58 coordinator account addresses")
    accounts: ChainAccountsConfig
    refresh_interval_seconds: float = Field(1.0, gt=0, le=1.0)
    timeout_seconds: float = Field(2.0, gt=0, le=30)
    max_response_bytes: int = Field(8 * 1024 * 1024, ge=1024)

    _check_crunch = field_validator("crunch_id")(lambda v: validate_id(v, "crunch id"))

    @field_validator("coordinators")
    @classmethod
    def _check_coordinators(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a coordinator account is listed twice")
        return value

    @field_validator("rpc_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("rpc_url must be an http:// or https:// URL")
        return value

    @classmethod
    def from_json(cls, data: bytes | str) -> ChainRegistryConfig:
        try:
            return cls.model_validate_json(data)
        except (ValidationError, ConfigError) as exc:
            raise ConfigError(ErrorCode.REGISTRY_INVALID, f"chain registry configuration is invalid: {exc}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class _AccountJson(_Strict):
    owner: str
    data: list[str] = Field(min_length=2, max_length=2, description='[base64 bytes, "base64"]')

    @field_validator("data")
    @classmethod
    def _check_encoding(cls, value: list[str]) -> list[str]:
        if value[1] != "base64":
            raise ValueError("account data is not base64-encoded")
        return value


class _Context(_Strict):
    slot: int


class _MultipleAccounts(_Strict):
    context: _Context
    value: list[_AccountJson | None]


class _KeyedAccount(_Strict):
    pubkey: str
    account: _AccountJson


class _ProgramAccounts(_Strict):
    context: _Context
    value: list[_KeyedAccount]


def _raw(address: bytes, account: _AccountJson) -> RawAccount:
    try:
        return RawAccount(address, pubkey_bytes(account.owner), base64.b64decode(account.data[0], validate=True))
    except ValueError:
        raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"account {address_text(address)}: undecodable owner or data") from None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's trust store, loaded once per process (each load costs ~0.1 s)."""
    return ssl.create_default_context()


class SolanaRpc:
    """The JSON-RPC calls the adapter makes. Raises only `ConfigError` (CHAIN_RPC_*)."""

    def __init__(self, url: str, *, timeout: float, max_response_bytes: int) -> None:
        self._url = url
        self._max_response_bytes = max_response_bytes
        self._client = httpx.Client(
            timeout=timeout, verify=_tls_context(), headers={"content-type": "application/json"})
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, params: list[Any]) -> Any:
        request_id = next(self._ids)
        body = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        answer = self._post(method, body.encode())
        try:
            reply = json.loads(answer)
        except (ValueError, RecursionError):
            raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"{method}: the answer is not JSON") from None
        if not isinstance(reply, dict) or reply.get("id") != request_id:
            raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"{method}: the answer is not a JSON-RPC reply to it")
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise ConfigError(
                ErrorCode.CHAIN_RPC_ERROR,
                f"{method}: JSON-RPC error {error.get('code')!r}: {str(error.get('message'))[:200]}")
        if "result" not in reply:
            raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"{method}: the reply has no result")
        return reply["result"]

    def _post(self, method: str, body: bytes) -> bytes:
        try:
            with self._client.stream("POST", self._url, content=body) as response:
                if response.status_code == 429:
                    raise RateLimited(response.headers.get("retry-after"))
                if response.status_code != 200:
                    raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"{method}: HTTP {response.status_code}")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self._max_response_bytes:
                        raise ConfigError(
                            ErrorCode.CHAIN_RPC_ERROR, f"{method}: answer over {self._max_response_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise ConfigError(ErrorCode.CHAIN_RPC_TIMEOUT, f"{method}: no answer within the timeout") from None
        except httpx.TransportError as exc:
            raise ConfigError(ErrorCode.CHAIN_RPC_UNREACHABLE, f"{method}: {type(exc).__name__}: {exc}"[:300]) from None
        except httpx.HTTPError as exc:
            raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"{method}: {type(exc).__name__}: {exc}"[:300]) from None

    def _options(self, min_slot: int | None, **extra: Any) -> dict[str, Any]:
        options = {"commitment": COMMITMENT, "encoding": "base64", **extra}
        if min_slot is not None:
            options["minContextSlot"] = min_slot
        return options

    def multiple_accounts(
        self, addresses: Sequence[bytes], min_slot: int | None = None
    ) -> tuple[int, list[RawAccount | None]]:
        """(slot, the accounts in order, None where none exists), in calls of at most 100."""
        accounts: list[RawAccount | None] = []
        slot = min_slot or 0
        for start in range(0, len(addresses), MAX_ACCOUNTS_PER_CALL):
            batch = addresses[start:start + MAX_ACCOUNTS_PER_CALL]
            result = self._parse(_MultipleAccounts, "getMultipleAccounts", self.call(
                "getMultipleAccounts", [[address_text(a) for a in batch], self._options(min_slot)]))
            if len(result.value) != len(batch):
                raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, "getMultipleAccounts: answered another number of accounts")
            accounts += [_raw(a, v) if v is not None else None for a, v in zip(batch, result.value)]
            slot = max(slot, result.context.slot)
        return slot, accounts

    def program_accounts(self, program: bytes, memcmp: Sequence[tuple[int, bytes]], min_slot: int | None) -> list[RawAccount]:
        """The accounts `program` owns whose bytes at each offset equal the given bytes."""
        filters = [{"memcmp": {"offset": offset, "bytes": base64.b64encode(value).decode(), "encoding": "base64"}}
                   for offset, value in memcmp]
        result = self._parse(_ProgramAccounts, "getProgramAccounts", self.call(
            "getProgramAccounts", [address_text(program), self._options(min_slot, filters=filters, withContext=True)]))
        try:
            return [_raw(pubkey_bytes(item.pubkey), item.account) for item in result.value]
        except ValueError:
            raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, "getProgramAccounts: an account address is not base58") from None

    @staticmethod
    def _parse(model: type[_Strict], method: str, result: Any) -> Any:
        try:
            return model.model_validate(result)
        except ValidationError:
            raise ConfigError(ErrorCode.CHAIN_RPC_ERROR, f"{method}: the result is not of the documented shape") from None


class RateLimited(ConfigError):
    """HTTP 429, with the server's Retry-After (seconds) when it sent a number."""

    def __init__(self, retry_after: str | None) -> None:
        super().__init__(ErrorCode.CHAIN_RPC_RATE_LIMITED, "the RPC endpoint is rate limiting this client")
        try:
            self.retry_after = min(max(float(retry_after or 0), 0.0), MAX_RATE_LIMIT_WAIT_SECONDS)
        except ValueError:
            self.retry_after = 0.0


class ChainRegistry:
    """A `RegistrySource` reading the crunch's identities from the chain (see the module doc)."""

    def __init__(
        self,
        config: ChainRegistryConfig,
        *,
        on_failure: Callable[[ConfigError], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._rpc = SolanaRpc(config.rpc_url, timeout=config.timeout_seconds,
                              max_response_bytes=config.max_response_bytes)
        self._on_failure = on_failure
        self._clock = clock
        self._reported: ErrorCode | None = None  # the failure already reported, until a refresh succeeds
        self._logged_refusals: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.healthy = True
        try:
            self._state = self._read_typed()  # the first read must succeed: there is nothing to fall back on
        except ConfigError:
            self._rpc.close()
            raise

    def current(self) -> RegistrySnapshot:
        return self._state[0]

    @property
    def fetched_at(self) -> int:
        """When the current snapshot was read (as `RegistryFile.fetched_at`; for metrics)."""
        return self._state[0].fetched_at

    def facts(self) -> mapping.ChainFacts:
        """What the same refresh read beyond the registry: hotkeys by wallet, refusals."""
        return self._state[1]

    def refresh(self) -> None:
        """One refresh now. Raises the typed error of a failed one (the last snapshot stays)."""
        try:
            self._state = self._read_typed()
        except ConfigError as exc:
            self.healthy = False
            if exc.code is not self._reported:
                self._reported = exc.code
                log.error("chain registry: keeping the snapshot fetched at %s: %s", self._state[0].fetched_at, exc)
                if self._on_failure is not None:
                    self._on_failure(exc)
            raise
        if not self.healthy:
            log.info("chain registry: refreshed again")
        self.healthy, self._reported = True, None

    def start(self) -> None:
        """Refresh in a daemon thread every `refresh_interval_seconds` until `close()`."""
        self._thread = threading.Thread(target=self._loop, name="chain-registry", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._rpc.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.refresh_interval_seconds):
            try:
                self.refresh()
            except RateLimited as exc:
                self._stop.wait(exc.retry_after)
            except ConfigError:
                pass  # reported by refresh(); the staleness rule decides when to stop trusting

    def _read_typed(self) -> tuple[RegistrySnapshot, mapping.ChainFacts]:
        """`_read`, whose unexpected failures are typed too: the refresh thread must never die."""
        try:
            return self._read()
        except ConfigError:
            raise
        except Exception as exc:
            log.exception("chain registry: unexpected failure of a refresh")
            raise ConfigError(ErrorCode.REGISTRY_UNAVAILABLE, f"chain registry refresh failed: {type(exc).__name__}") from None

    def _read(self) -> tuple[RegistrySnapshot, mapping.ChainFacts]:
        config, kinds, rpc = self.config, self.config.accounts, self._rpc
        refused: list[ConfigError] = []
        addresses = [pubkey_bytes(a) for a in config.coordinators]
        slot, found = rpc.multiple_accounts(addresses)
        coordinators = mapping.decode_each(self._existing(addresses, found, "coordinator", refused),
                                           decode_coordinator, kinds.coordinator, refused)
        keys = mapping.coordinator_keys(coordinators, refused)

        owners = [key.public_key_bytes for key in keys]
        pdas = [kinds.certificate.address_for(owner) for owner in owners]
        _, found = rpc.multiple_accounts(pdas, slot)
        by_pda = mapping.decode_each((a for a in found if a is not None), decode_certificate, kinds.certificate, refused)
        certificates = {owner: by_pda[pda] for owner, pda in zip(owners, pdas) if pda in by_pda}

        crunch = pubkey_bytes(config.crunch_address)
        listed = rpc.program_accounts(kinds.model.owner, [(0, kinds.model.tag), (MODEL_CRUNCH_OFFSET, crunch)], slot)
        models = mapping.decode_each(listed, decode_model, kinds.model, refused)

        wallets = sorted({model.cruncher_wallet for model in models.values()})
        pdas = [kinds.cruncher.address_for(wallet) for wallet in wallets]
        _, found = rpc.multiple_accounts(pdas, slot)
        by_pda = mapping.decode_each((a for a in found if a is not None), decode_cruncher, kinds.cruncher, refused)
        crunchers = {wallet: by_pda[pda] for wallet, pda in zip(wallets, pdas) if pda in by_pda}

        registry = mapping.build_registry(
            config.crunch_id, mapping.with_enrolled_tls_keys(keys, certificates, refused),
            mapping.model_entries(crunch, models, crunchers, refused))
        facts = mapping.ChainFacts(
            hotkeys={wallet: cruncher.hotkey for wallet, cruncher in crunchers.items()},
            refused=tuple(refused),
        )
        self._log_refusals(facts.refused)
        return RegistrySnapshot(registry, int(self._clock())), facts

    @staticmethod
    def _existing(addresses: list[bytes], found: list[RawAccount | None], what: str,
                  refused: list[ConfigError]) -> list[RawAccount]:
        for address, account in zip(addresses, found):
            if account is None:
                refused.append(ConfigError(ErrorCode.CHAIN_ACCOUNT_MISSING,
                                           f"{what} account {address_text(address)} does not exist"))
        return [account for account in found if account is not None]

    def _log_refusals(self, refused: tuple[ConfigError, ...]) -> None:
        """Each change of what was left out is logged once, not once a second."""
        messages = tuple(str(exc) for exc in refused)
        if messages != self._logged_refusals:
            self._logged_refusals = messages
            for message in messages:
                log.warning("chain registry: left out %s", message)
