"""The device agent: publishes a device's messages to its hospital broker without losing any.

Path of a message: :meth:`DeviceAgent.publish` encodes it and puts it on a bounded
in-memory queue; the agent's one network thread moves queued messages into the on-disk
:class:`~device_agent.outbox.Outbox`, hands the oldest unacknowledged rows to paho
(QoS 1, at most ``max_inflight`` at once) while connected, and deletes a row only when its
PUBACK arrives. When the connection drops, the agent forgets what was in flight and, after
the next CONNACK, publishes again from the oldest unacknowledged row, so the broker
receives every message at least once and in order. Subscribers de-duplicate by
(device, seq).

All paho calls happen on the network thread (``client.loop``), so no callback races the
bookkeeping of message ids. Reconnects use exponential backoff with full jitter, also when the
broker refuses the credentials or the TLS handshake fails (counted in ``stats`` as
``auth_refused`` / ``connect_refused`` / ``tls_failures``, each logged with what to check);
messages keep accumulating in the on-disk buffer meanwhile.
"""
from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections import Counter, deque

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device_agent.outbox import Outbox
from device_agent.settings import AgentSettings
from protocols.errors import IomtError
from protocols.logsetup import clip
from protocols.messages import DeviceRegistration, Message, Presence, stream_of, to_wire
from protocols.topics import Topic

log = logging.getLogger(__name__)

#: Timing constants; tests may shrink them.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 30.0
LOOP_IDLE_S = 0.05
MOVE_BATCH = 5_000


#: User names already warned about not being their agent's device id (once per process).
_WARNED_USERNAMES: set[str] = set()
#: CONNACK reasons (paho's names, MQTT 3.1.1 and 5) that mean the credentials are wrong.
AUTH_REFUSALS = frozenset({"Not authorized", "Bad user name or password"})


class AgentError(IomtError):
    """The agent cannot do what was asked (closed, or the message has no topic)."""


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): exponential, full jitter."""
    cap = min(BACKOFF_MAX_S, BACKOFF_MIN_S * (2 ** min(attempt, 30)))
    return rng.uniform(BACKOFF_MIN_S / 2, cap)


class DeviceAgent:
    """Publishes one device's messages over MQTT with QoS 1, buffering through outages.

    Use as a context manager, or call :meth:`start` and :meth:`close`.

    Parameters
    ----------
    settings
        Broker, identity, TLS/credentials and buffer sizes.
    """

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        s = settings
        self.home = Topic(s.hospital, s.device_class, s.device_id, "presence")
        self.stats: Counter[str] = Counter()
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=s.queue_max)
        self._outbox: Outbox | None = None
        self._registrations: list[tuple[str, bytes]] = []
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._acks: deque[tuple[int, bool]] = deque()
        self._last_handed = 0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self._refused: str | None = None  # reason of the last CONNACK refusal, until the next try
        self._client = self._make_client()
        if s.username and s.username != s.device_id and s.username not in _WARNED_USERNAMES:
            _WARNED_USERNAMES.add(s.username)
            log.warning("user name %r is not the device id %r: a broker with per-device accounts (iomt broker "
                        "--passwords) lets an account publish only under its own name, and over MQTT 3.1.1 it "
                        "acknowledges and drops the rest", s.username, s.device_id)
        self.add_registration(DeviceRegistration(
            hospital=s.hospital, device_id=s.device_id, device_class=s.device_class,
            patient_id=s.patient_id, streams=s.streams, model=s.model, manufacturer=s.manufacturer))

    # -- public API --------------------------------------------------------------------------

    def add_registration(self, registration: DeviceRegistration) -> None:
        """Publish ``registration`` retained now (if connected) and on every reconnect."""
        topic = Topic(registration.hospital, registration.device_class, registration.device_id, "registration")
        self._registrations.append((str(topic), to_wire(registration)))

    def topic_for(self, msg: Message) -> Topic:
        """The topic ``msg`` goes to: this agent's device, the message's stream."""
        device_id = getattr(msg, "device_id", None) or self.settings.device_id
        return Topic(self.settings.hospital, self.settings.device_class, device_id, stream_of(msg))

    def publish(self, msg: Message, topic: Topic | None = None, *, block: bool = True,
                timeout: float | None = None) -> bool:
        """Queue ``msg`` for delivery; returns False if it was dropped because memory is full.

        With ``block=True`` a full queue applies back-pressure (waits up to ``timeout``)
        instead of dropping; a device sampling in real time passes ``block=False``.
        """
        return self.publish_raw(str(topic or self.topic_for(msg)), to_wire(msg), block=block, timeout=timeout)

    def publish_raw(self, topic: str, payload: bytes, *, block: bool = True, timeout: float | None = None) -> bool:
        """Queue already-encoded ``payload`` for ``topic`` (fault injection, relays)."""
        if self._stopping.is_set():
            raise AgentError("agent is closed")
        try:
            self._queue.put((topic, payload), block=block, timeout=timeout)
        except queue.Full:
            self.stats["dropped_queue_full"] += 1
            if self.stats["dropped_queue_full"] in (1, 10, 100) or self.stats["dropped_queue_full"] % 1000 == 0:
                log.warning("memory queue full (%d): dropped %d messages so far, latest on %s",
                            self.settings.queue_max, self.stats["dropped_queue_full"], topic)
            return False
        self._idle.clear()
        self.stats["queued"] += 1
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def buffered(self) -> int:
        """Messages not yet acknowledged by the broker (in memory or on disk)."""
        return self._queue.qsize() + (len(self._outbox) if self._outbox is not None else 0)

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the broker has acknowledged everything queued so far."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._queue.empty() and self._idle.wait(0.05) and self._queue.empty():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False

    def start(self) -> "DeviceAgent":
        if self._thread is None:
            self._outbox = Outbox(self.settings.buffer_path, self.settings.buffer_max)
            self._thread = threading.Thread(target=self._run, name=f"agent-{self.settings.device_id}", daemon=True)
            self._thread.start()
        return self

    def close(self, flush_timeout: float | None = 10.0) -> None:
        """Deliver what is queued (up to ``flush_timeout``), say offline, disconnect."""
        if self._thread is None:
            return
        if flush_timeout and self.connected:
            self.flush(flush_timeout)
        self._stopping.set()
        self._thread.join()
        self._thread = None
        if self._outbox is not None:
            left = self.buffered
            if left:
                log.warning("closing with %d unacknowledged messages (kept in %s)", left,
                            self.settings.buffer_path or "memory: lost")
            self._outbox.close()

    def __enter__(self) -> "DeviceAgent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paho --------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.mqtt_version == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.client_id or f"{s.hospital}-{s.device_id}",
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        if s.username:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
            if not s.tls:
                log.warning("user %s logs in to %s without TLS: the password crosses the network in clear "
                            "(use mqtts://)", s.username, s.broker)
        if s.tls:
            client.tls_set(ca_certs=str(s.ca_file) if s.ca_file else None,
                           certfile=str(s.cert_file) if s.cert_file else None,
                           keyfile=str(s.key_file) if s.key_file else None, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(s.tls_insecure)
        offline = to_wire(Presence(device_id=s.device_id, online=False))
        client.will_set(str(self.home), offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # The broker closes the connection next; _run() then backs off and retries.
            self._refused = str(reason_code)
            if self._refused in AUTH_REFUSALS:
                self.stats["auth_refused"] += 1
                log.error("broker %s refused user %r: %s (check username/password and the broker's "
                          "password file); refusal %d", self.settings.broker, self.settings.username,
                          reason_code, self.stats["auth_refused"])
            else:
                self.stats["connect_refused"] += 1
                log.error("broker %s refused the connection: %s", self.settings.broker, reason_code)
            return
        self.stats["connects"] += 1
        log.info("connected to %s as %s", self.settings.broker, self.settings.device_id)
        try:
            for topic, payload in self._registrations:
                client.publish(topic, payload, qos=1, retain=True)
            birth = to_wire(Presence(device_id=self.settings.device_id, online=True))
            client.publish(str(self.home), birth, qos=1, retain=True)
        except Exception:  # a failing callback must not kill the network loop
            log.exception("publishing registration/birth failed")
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and not self._stopping.is_set():
            log.warning("disconnected from %s: %s", self.settings.broker, reason_code)
            self.stats["disconnects"] += 1
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append((mid, not reason_code.is_failure))

    # -- network thread ----------------------------------------------------------------------

    def _run(self) -> None:
        client, attempt, opened = self._client, 0, False
        while not self._stopping.is_set():
            if not opened:
                try:
                    if self.stats["connect_attempts"] == 0:
                        client.connect(self.settings.host, self.settings.port, self.settings.keepalive)
                    else:
                        client.reconnect()
                    opened = True
                except ssl.SSLError as err:  # before OSError: SSLError is one
                    self.stats["tls_failures"] += 1
                    delay = backoff_delay(attempt, self._rng)
                    log.error("TLS handshake with %s failed: %s (%s); retry %d in %.2fs",
                              self.settings.broker, err, self._tls_hint(err), attempt + 1, delay)
                    attempt += 1
                    self._move_to_outbox()
                    self._stopping.wait(delay)
                    continue
                except (OSError, ValueError) as err:
                    delay = backoff_delay(attempt, self._rng)
                    log.warning("cannot reach %s (%s); retry %d in %.2fs", self.settings.broker, err, attempt + 1, delay)
                    attempt += 1
                    self._move_to_outbox()
                    self._stopping.wait(delay)
                    continue
                finally:
                    self.stats["connect_attempts"] += 1
            busy = self._pump()
            rc = client.loop(timeout=0.0 if busy else LOOP_IDLE_S)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self._connected.is_set():
                    attempt = 0
                continue
            self._connected.clear()
            opened = False
            self._reset_inflight()
            delay = backoff_delay(attempt, self._rng)
            attempt += 1
            if self._refused is not None:
                log.info("retrying %s in %.2fs after refusal (%s)", self.settings.broker, delay, self._refused)
                self._refused = None
            else:
                log.warning("connection to %s lost (%s); reconnecting in %.2fs", self.settings.broker, rc, delay)
            self._stopping.wait(delay)
        self._shutdown()

    def _tls_hint(self, err: ssl.SSLError) -> str:
        if isinstance(err, ssl.SSLCertVerificationError):
            where = self.settings.ca_file or "the system CA store"
            return f"the broker's certificate is not trusted by {where} or does not name {self.settings.host}"
        return "is the port a TLS listener, and do client and broker share a TLS version?"

    def _move_to_outbox(self) -> None:
        rows: list[tuple[str, bytes]] = []
        try:
            while len(rows) < MOVE_BATCH:
                rows.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if rows:
            dropped = self._outbox.add(rows)
            if dropped:
                self.stats["dropped_buffer_full"] += dropped
                log.warning("on-disk buffer full (%d rows): dropped %d messages", self._outbox.max_rows, dropped)

    def _reset_inflight(self) -> None:
        """After a lost connection: keep what was acknowledged, re-send the rest from the outbox.

        paho would re-send its own copies after the next CONNACK; dropping them and starting
        again from the oldest unacknowledged row keeps the order and the bookkeeping simple.
        """
        self._move_to_outbox()
        self._apply_acks()
        self._client.drop_out_messages()
        self.stats["resent_after_reconnect"] += len(self._inflight)
        self._inflight.clear()
        self._acks.clear()
        self._last_handed = 0

    def _apply_acks(self) -> None:
        done: list[int] = []
        while self._acks:
            mid, ok = self._acks.popleft()
            row = self._inflight.pop(mid, None)
            if row is None:
                continue  # registration / presence
            done.append(row)
            self.stats["acked" if ok else "refused_by_broker"] += 1
            if not ok:
                log.warning("broker refused message %d; dropped", row)
        self._outbox.ack(done)

    def _pump(self) -> bool:
        """Move, acknowledge and publish one batch; True while there is more to do."""
        self._move_to_outbox()
        self._apply_acks()
        if self._connected.is_set():
            room = self.settings.max_inflight - len(self._inflight)
            if room > 0:
                for row_id, topic, payload in self._outbox.after(self._last_handed, room):
                    info = self._client.publish(topic, payload, qos=1)
                    if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                        log.warning("publish on %s failed: %s (payload %s)", topic, info.rc, clip(payload))
                        break
                    self._inflight[info.mid] = row_id
                    self._last_handed = row_id
                    self.stats["sent"] += 1
        idle = not self._inflight and len(self._outbox) == 0 and self._queue.empty()
        if idle:
            self._idle.set()
        return not idle and self._connected.is_set() and (
            bool(self._acks) or not self._queue.empty() or len(self._inflight) < self.settings.max_inflight)

    def _shutdown(self) -> None:
        client = self._client
        if self._connected.is_set():
            try:
                offline = to_wire(Presence(device_id=self.settings.device_id, online=False))
                info = client.publish(str(self.home), offline, qos=1, retain=True)
                deadline = time.monotonic() + 2.0
                while not info.is_published() and time.monotonic() < deadline:
                    client.loop(timeout=0.05)
                client.disconnect()
                client.loop(timeout=0.05)
            except Exception:  # shutting down: log, never raise from the thread
                log.exception("clean disconnect failed")
        self._move_to_outbox()
        self._apply_acks()
        self._connected.clear()
