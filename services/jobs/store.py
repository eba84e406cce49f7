"""The JetStream resources of asynchronous serving, and the only code that touches them.

- `MS_WORK`: a work-queue stream (each message is removed once acknowledged). Subjects
  `work.<band>.<model token>` hold jobs and batch lines, one durable pull consumer per band and
  model with explicit ack, ack wait and max deliver; `plan` holds batches to expand.
- `MS_DEAD`: the dead letter: JetStream's own max-deliveries advisories for MS_WORK, captured
  durably; workers turn each into a failed job or line.
- `MS_JOBS` (KV): job, batch, file and idempotency records. Every state change is a
  compare-and-set on the record's revision (fencing).
- `MS_OUT` (KV): one outcome per batch line, written with create (only if absent): a redelivered
  line can never produce a second result.
- `MS_FILES` (object store): batch input, output and error files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.common.errors import Unavailable
from services.common.tls import TlsFiles, client_ssl_context

log = logging.getLogger(__name__)

WORK, DEAD, JOBS, OUT, FILES = "MS_WORK", "MS_DEAD", "MS_JOBS", "MS_OUT", "MS_FILES"
PLAN_SUBJECT = "plan"
CANCEL_SUBJECT = "ms.jobs.cancel"
#: Messages (and so records, lines and file chunks) up to this size; the server's max_payload
#: must allow it (localmesh starts nats-server with 8 MiB).
MAX_MSG_BYTES = 8 * 1024 * 1024
_WRONG_LAST_SEQUENCE = (10071, 10164)

StoreErrors = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError)
#: What a fetch raises when it got nothing: no message in time, or a pull request answered "no
#: responders" (503) while a replicated consumer's leader moves or is busy: try again, quietly.
NothingFetched = (nats.errors.TimeoutError, TimeoutError, nats.js.errors.ServiceUnavailableError)


@dataclass(frozen=True)
class StoreSettings:
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    #: Copies of every stream and bucket (3 on a JetStream cluster).
    replicas: int = 1
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    timeout_s: float = 5.0
    #: The process's certificate: TLS to JetStream, which requires one from the mesh CA (None:
    #: plaintext, --insecure-dev).
    tls: TlsFiles | None = None


def work_subject(band: str, token: str) -> str:
    return f"work.{band}.{token}"


class JobStore:
    """A connection to JetStream with every stream and bucket ensured."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.kv: dict[str, KeyValue] = {}
        self._files: ObjectStore | None = None

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise Unavailable("the job store is not connected yet; retry shortly")
        return self._js

    @property
    def files(self) -> ObjectStore:
        if self._files is None:
            raise Unavailable("the job store is not connected yet; retry shortly")
        return self._files

    async def connect(self, name: str) -> None:
        """Connect (retrying for ever in the background after the first success) and ensure
        every resource exists; safe to run in many processes at once."""
        tls = client_ssl_context(self.settings.tls) if self.settings.tls else None
        self.nc = await nats.connect(list(self.settings.servers), name=name, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.5, connect_timeout=2, allow_reconnect=True,
                                     error_cb=_log_error, disconnected_cb=_log_disconnect, tls=tls)
        self._js = self.nc.jetstream(timeout=self.settings.timeout_s)
        await self._ensure()

    async def close(self) -> None:
        """Close at once: messages held and not acknowledged are delivered again elsewhere (drain
        would wait on pull subscriptions' queues)."""
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def _ensure(self) -> None:
        s, js = self.settings, self.js
        await self._add_stream(api.StreamConfig(
            name=WORK, subjects=["work.*.*", PLAN_SUBJECT], retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE, num_replicas=s.replicas, max_msg_size=MAX_MSG_BYTES,
            duplicate_window=120.0))
        await self._add_stream(api.StreamConfig(
            name=DEAD, subjects=[f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{WORK}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE, num_replicas=s.replicas))
        for bucket in (JOBS, OUT):
            try:
                self.kv[bucket] = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                self.kv[bucket] = await js.create_key_value(api.KeyValueConfig(
                    bucket=bucket, history=1, replicas=s.replicas, max_value_size=MAX_MSG_BYTES,
                    storage=api.StorageType.FILE))
        try:
            self._files = await js.object_store(FILES)
        except nats.js.errors.BucketNotFoundError:
            self._files = await js.create_object_store(FILES, config=api.ObjectStoreConfig(
                replicas=s.replicas, storage=api.StorageType.FILE))

    async def _add_stream(self, config: api.StreamConfig) -> None:
        assert config.name is not None
        try:
            await self.js.stream_info(config.name)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.stream_info(config.name)  # another process created it first

    # --- records (compare-and-set) ----------------------------------------------------------

    async def get(self, bucket: str, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv[bucket].get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value or b"", entry.revision or 0

    async def create(self, bucket: str, key: str, value: bytes, ttl_s: float | None = None) -> int | None:
        """Write only if the key has no value: the revision, or None when it already had one."""
        try:
            return await self.kv[bucket].create(key, value, msg_ttl=ttl_s)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return None  # the server refused: it has a value (the client's re-read may miss a racing write)

    async def cas(self, bucket: str, key: str, value: bytes, last: int, ttl_s: float | None = None) -> int | None:
        """Replace the value only if its revision is still `last`: the new revision, or None when
        someone else wrote in between (the caller lost the race and must re-read)."""
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
        try:
            ack = await self.js.publish(f"$KV.{bucket}.{key}", value, headers=headers,
                                        msg_ttl=ttl_s if ttl_s else None)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        return ack.seq

    async def delete(self, bucket: str, key: str) -> None:
        await self.kv[bucket].purge(key)

    async def scan(self, bucket: str, prefix: str) -> AsyncIterator[tuple[str, bytes, int]]:
        """Every live (key, value, revision) under `prefix` (an ordered read of the bucket)."""
        start = f"$KV.{bucket}."
        async for msg in self.read_subject(f"KV_{bucket}", f"{start}{prefix}>", last_per_subject=True):
            if msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
                continue
            yield msg.subject[len(start):], msg.data, msg.metadata.sequence.stream

    async def read_subject(self, stream: str, subject: str, last_per_subject: bool = False) -> AsyncIterator[Msg]:
        """Every message of a stream on `subject`, oldest first, through a short-lived consumer.
        All of them or an error (never a silently short read: outputs are written from this)."""
        policy = api.DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else api.DeliverPolicy.ALL
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=policy, inactive_threshold=30.0,
                                    mem_storage=True, num_replicas=1, filter_subject=subject)
        sub = await self.js.pull_subscribe(subject, stream=stream, config=config)
        try:
            info = await sub.consumer_info()
            left, empty = info.num_pending or 0, 0
            while left > 0:
                try:
                    msgs = await sub.fetch(min(left, 512), timeout=self.settings.timeout_s)
                except NothingFetched:
                    empty += 1
                    if empty >= 5:
                        raise nats.errors.TimeoutError from None  # the caller retries later
                    await asyncio.sleep(0.1)
                    continue
                empty = 0
                for msg in msgs:
                    yield msg
                left -= len(msgs)
        finally:
            await sub.unsubscribe()

    async def count(self, stream: str, subject: str) -> int:
        """Messages of a stream on `subject`: exact, read from the server (a consumer's pending
        count), without fetching them."""
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL,
                                    inactive_threshold=5.0, mem_storage=True, num_replicas=1,
                                    filter_subject=subject)
        info = await self.js.add_consumer(stream, config=config)
        try:
            return int(info.num_pending or 0)
        finally:
            if info.name:
                with contextlib.suppress(*StoreErrors):  # else it goes away by itself once inactive
                    await self.js.delete_consumer(stream, info.name)

    # --- the work queue ---------------------------------------------------------------------

    async def enqueue(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Publish work; the same msg_id within two minutes is stored once (JetStream dedupe)."""
        await self.js.publish(subject, payload, headers={api.Header.MSG_ID.value: msg_id})

    async def consumer(self, name: str, subject: str, stream: str = WORK) -> JetStreamContext.PullSubscription:
        """The durable pull consumer every worker shares for `subject` (created once); callers keep
        the subscription."""
        s = self.settings
        config = api.ConsumerConfig(
            durable_name=name, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=s.ack_wait_s, max_deliver=s.max_deliver,
            max_ack_pending=10_000, filter_subject=subject, num_replicas=s.replicas)
        try:
            return await self.js.pull_subscribe(subject, durable=name, stream=stream, config=config)
        except nats.js.errors.BadRequestError:  # created by another worker in between
            return await self.js.pull_subscribe_bind(durable=name, stream=stream)


async def _log_error(exc: Exception) -> None:
    log.warning("JetStream connection: %s", exc)


async def _log_disconnect() -> None:
    log.warning("JetStream connection lost; reconnecting")
