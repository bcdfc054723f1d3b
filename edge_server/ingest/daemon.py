"""`iomt edge run`: the hospital's ingest daemon.

It subscribes to ``iomt/{hospital}/#`` with QoS 1 on a persistent MQTT 5 session (clean
start off, a session expiry, a client id stable per hospital and data directory) and acks
manually: deliveries are validated into a batch, the batch is committed to the store, and
only then are its PUBACKs sent. A daemon killed at any point therefore loses nothing the
broker delivered (unacknowledged messages are redelivered to the resumed session) and
stores nothing twice (redeliveries hit the store's UNIQUE constraints and count as
duplicates). No message's content can stop it: what validation lets through but the store
cannot hold is rejected by the store (``unstorable``) and the rest of the batch committed
and acknowledged; only a failure of the store itself ends the daemon (exit 3).

Exit codes: 0 stopped by SIGTERM/SIGINT after a final commit; 2 bad configuration (or a
data directory that belongs to another hospital); 3 the store failed (nothing of the
failed batch was acknowledged); 4 the broker refused the connection (credentials, client
id or authorisation); 5 any other failure of the loop (a bug: logged with its traceback;
nothing uncommitted was acknowledged either).
"""
from __future__ import annotations

import argparse
import logging
import random
import secrets
import select
import signal
import socket
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocols.config import add_config_argument
from protocols.errors import ConfigError, IomtError
from protocols.topics import subscription

from edge_server.ingest.background import BackgroundPreprocessor
from edge_server.ingest.ingestor import Ingestor
from edge_server.ingest.metrics import EdgeMetrics, MetricsServer, create_app
from edge_server.ingest.settings import EdgeSettings, load_settings
from edge_server.ingest.sqlite_store import SqliteStore
from edge_server.ingest.store import Batch, Store

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_BROKER_REFUSED = 4
EXIT_INTERNAL = 5


class StoreFailed(IomtError):
    """The store could not commit a batch (nothing of it was acknowledged)."""

RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 10.0
LOOP_TIMEOUT_S = 0.05
#: A pending batch is committed as soon as the socket has been idle this long: the broker
#: stops sending once its in-flight window (Mosquitto's max_inflight_messages, 20 by
#: default) is unacknowledged, so waiting for a full batch would only add latency.
IDLE_FLUSH_S = 0.002
KEEPALIVE_S = 30
#: CONNACK reason codes after which retrying cannot help.
CLIENT_ID_META = "mqtt_client_id"  # the store's meta key of our session's client id
FATAL_CONNACK = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux only


def _defer_write(client, userdata, sock) -> None:
    """paho's external-loop hook: writes happen when our loop calls ``loop_write``."""


def _set_cork(sock, on: int) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, on)
    except OSError:  # not TCP (or closed): nothing to coalesce
        pass


class EdgeDaemon:
    """One hospital's ingest loop; :meth:`run` blocks until :meth:`request_stop`."""

    def __init__(self, settings: EdgeSettings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or SqliteStore(settings.data_dir, synchronous=settings.sqlite_synchronous)
        owner = self.store.get_meta("hospital")
        if owner and owner != settings.hospital:
            raise ConfigError(f"data dir {settings.data_dir} holds hospital {owner!r}, not {settings.hospital!r}")
        self.client_id = session_client_id(settings, self.store)
        self.store.set_meta("hospital", settings.hospital)
        self.metrics = EdgeMetrics(settings.data_dir, settings.hospital)
        self.ingestor = Ingestor(settings.hospital, self.store.devices(), settings.max_payload)
        self._stop = threading.Event()
        self._batch = Batch()
        self._acks: list[tuple[int, int]] = []
        self._batch_started = 0.0
        self._connected = False
        self._subscribed = False
        self._connections = 0
        self._fatal: str | None = None
        self._client: mqtt.Client | None = None
        self._sink = None

    # -- public ----------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self._stop.set()

    def health(self) -> dict:
        return {"ok": self._connected and self._subscribed, "connected": self._connected,
                "subscribed": self._subscribed, "hospital": self.settings.hospital,
                "pending": self._batch.received}

    def run(self) -> int:
        s = self.settings
        server = preprocessor = None
        if s.metrics_port is not None:
            server = MetricsServer(create_app(self.metrics, self.health), s.metrics_host, s.metrics_port).start()
            log.info("metrics on http://%s:%d/metrics", s.metrics_host, server.port)
        if s.influx.enabled:
            from edge_server.ingest.influx import InfluxSink
            self._sink = InfluxSink(s.influx, s.hospital)
        if s.preprocess_interval_s > 0:
            preprocessor = BackgroundPreprocessor(s)
            preprocessor.start()
        self._client = self._make_client()
        try:
            return self._loop()
        finally:
            if preprocessor:
                preprocessor.stop()
            if self._sink:
                self._sink.close()
            if server:
                server.stop()
            self.store.close()

    # -- MQTT ------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.mqtt_version == "5"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else False, manual_ack=True)
        if s.username:
            client.username_pw_set(s.username, s.password)
        host, _, tls = s.broker_address()
        if tls or s.tls_ca or s.tls_cert:
            client.tls_set(ca_certs=str(s.tls_ca) if s.tls_ca else None,
                           certfile=str(s.tls_cert) if s.tls_cert else None,
                           keyfile=str(s.tls_key) if s.tls_key else None)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        # Writes wait for our loop (see _send_acks); paho would otherwise send each ack alone.
        client.on_socket_register_write = _defer_write
        return client

    def _connect(self) -> bool:
        s = self.settings
        host, port, _ = s.broker_address()
        try:
            if self._connections == 0 and s.mqtt_version == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = s.session_expiry_s
                props.ReceiveMaximum = s.receive_maximum
                self._client.connect(host, port, keepalive=KEEPALIVE_S, clean_start=False, properties=props)
            elif self._connections == 0:  # MQTT 3.1.1: the session persists through clean_session=False
                self._client.connect(host, port, keepalive=KEEPALIVE_S)
            else:
                self._client.reconnect()
        except OSError as err:
            log.warning("broker %s:%d unreachable: %s", host, port, err)
            return False
        self._connections += 1
        if self._connections > 1:
            self.metrics.reconnects.inc()
        return True

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            if str(reason_code) in FATAL_CONNACK:
                self._fatal = str(reason_code)
            return
        self._connected = True
        log.info("connected to %s (session present: %s)", self.settings.broker, flags.session_present)
        if self.settings.mqtt_version == "5":
            client.subscribe(subscription(self.settings.hospital), options=SubscribeOptions(qos=1))
        else:
            client.subscribe(subscription(self.settings.hospital), qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        bad = [rc for rc in reason_codes if rc.is_failure]
        if bad:
            log.error("subscription to %s refused: %s", subscription(self.settings.hospital), bad)
            self._fatal = str(bad[0])
            return
        self._subscribed = True
        self.metrics.connected.set(1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected:
            log.warning("disconnected from broker: %s", reason_code)
        self._connected = self._subscribed = False
        self.metrics.connected.set(0)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if not self._batch.received:
            self._batch_started = time.monotonic()
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = msg._topic.decode("utf-8", "replace")
        self.ingestor.handle(topic, msg.payload, self._batch, time.time())
        if msg.qos > 0:
            self._acks.append((msg.mid, msg.qos))

    # -- batching --------------------------------------------------------------------------
    def _flush(self, ack: bool = True) -> None:
        """Commit the pending batch, then (still connected) acknowledge its deliveries."""
        batch, acks = self._batch, self._acks
        if not batch.received:
            return
        self._batch, self._acks = Batch(), []
        started = time.perf_counter()
        try:
            result = self.store.commit(batch)
        except Exception as err:
            raise StoreFailed(f"committing {batch.received} deliveries failed: {err}") from err
        self.metrics.observe_commit(batch, result, time.perf_counter() - started)
        if ack and acks:
            self._send_acks(acks)
        frames = batch.frames
        if result.refused:
            refused = {id(row) for row, _ in result.refused}
            frames = [f for f in frames if id(f) not in refused]
            if any(id(d) in refused for d in batch.devices):  # forget a registration the store refused
                self.ingestor.known = self.store.devices()
        if self._sink is not None and frames:
            self._sink.write_frames(frames)
        log.debug("committed %d deliveries: stored %s, %d duplicates, %d rejected", batch.received,
                  result.stored, result.duplicates, len(batch.rejections))

    def _send_acks(self, acks: list[tuple[int, int]]) -> None:
        """Queue the batch's PUBACKs (in delivery order, as MQTT requires) and write them at once.

        paho queues each ack without writing it (our ``on_socket_register_write`` hook defers
        writes to our loop); with TCP_CORK the kernel sends the batch's acks in a few segments,
        not one per message, so the broker has fewer to read.
        """
        client = self._client
        for mid, qos in acks:
            client.ack(mid, qos)
        sock = client.socket()
        cork = sock is not None and _TCP_CORK is not None
        if cork:
            _set_cork(sock, 1)
        try:
            client.loop_write()
        finally:
            if cork and client.socket() is sock:
                _set_cork(sock, 0)

    def _read(self, limit: int) -> MQTTErrorCode:
        """Handle whatever packets are buffered, up to ``limit`` deliveries.

        ``loop_read`` handles one packet per call, so call it while it keeps producing
        deliveries; the first call that produces none (nothing left to read, half a packet,
        or a control packet) ends the burst and the loop goes back to ``select``.
        """
        target = self._batch.received + limit
        while True:
            n = self._batch.received
            rc = self._client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._batch.received in (n, target):
                return rc

    def _loop(self) -> int:
        """Our own event loop on paho's external-loop API (``loop_read``/``loop_write``/``loop_misc``).

        ``Client.loop()`` runs a ``select`` and reads a single packet per call; draining a
        backlog that way costs a ``select`` (and its bookkeeping) per message. Here a readable
        socket is read until it runs dry, and ``select`` only waits when there is nothing to do.
        """
        s = self.settings
        batch_s = s.batch_ms / 1000.0
        backoff = RECONNECT_MIN_S
        busy = False
        try:
            while not self._stop.is_set():
                if self._fatal:
                    return EXIT_BROKER_REFUSED
                client = self._client
                sock = client.socket()
                if sock is None:
                    if not self._connect():
                        self._stop.wait(backoff * (0.5 + random.random()))
                        backoff = min(backoff * 2, RECONNECT_MAX_S)
                        continue
                    backoff = RECONNECT_MIN_S
                    sock, busy = client.socket(), False
                before = self._batch.received
                readable = busy
                if not busy:
                    timeout = LOOP_TIMEOUT_S
                    if before:
                        timeout = max(0.0, min(IDLE_FLUSH_S, self._batch_started + batch_s - time.monotonic()))
                    try:
                        ready, _, _ = select.select([sock], [sock] if client.want_write() else [], [], timeout)
                    except (OSError, ValueError):  # socket closed under us: loop_read reports it
                        ready = [sock]
                    readable = bool(ready)
                waited = not busy  # this pass waited in select (up to IDLE_FLUSH_S with a batch pending)
                rc = MQTTErrorCode.MQTT_ERR_SUCCESS
                if readable:
                    rc = self._read(max(1, s.batch_max - before))
                pending = self._batch.received
                busy = pending > before
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.want_write():
                    rc = client.loop_write()
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    rc = client.loop_misc()
                # Commit when the batch is full, when the socket stayed idle through a wait, or
                # when the oldest delivery has waited batch_ms; a socket that merely ran dry
                # between two bursts gets its IDLE_FLUSH_S wait first, so batches stay large.
                if pending and (pending >= s.batch_max or (waited and not busy)
                                or time.monotonic() - self._batch_started >= batch_s):
                    self._flush()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                    # Acks of a lost connection cannot be sent: store what we have; the broker
                    # redelivers it to the resumed session and the store drops the copies.
                    self._flush(ack=False)
                    self._connected = self._subscribed = False
                    busy = False
                    if client.socket() is not None:
                        client.disconnect()
            self._flush()
            self._close_client()
            return EXIT_OK
        except StoreFailed:
            log.exception("store failed; the uncommitted batch was not acknowledged")
            return EXIT_STORE
        except Exception:
            log.exception("the ingest loop failed (not the store); the uncommitted batch was not acknowledged")
            return EXIT_INTERNAL

    def _close_client(self) -> None:
        if self._client.socket() is None:
            return
        self._connected = self._subscribed = False
        self._client.disconnect()
        for _ in range(20):
            if self._client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break


def session_client_id(settings: EdgeSettings, store: Store) -> str:
    """The MQTT client id of this data dir's persistent session: ``--client-id``, else one kept in
    the store's meta.

    A new store gets a random id, so nobody can derive it and, on a broker that does not tie
    client ids to accounts, resume the edge's session and take its queued messages (``iomt
    broker`` with accounts also replaces it with the edge's user name). A store made before the
    id was kept there goes on with the id it was derived from, so its queued session survives.
    """
    if settings.client_id:
        return settings.client_id
    client_id = store.get_meta(CLIENT_ID_META)
    if not client_id:
        client_id = (settings.stable_client_id() if store.get_meta("hospital")
                     else f"iomt-edge-{settings.hospital}-{secrets.token_hex(12)}")
        store.set_meta(CLIENT_ID_META, client_id)
    return client_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, EdgeSettings)
    parser.add_argument("--hospital", help="hospital id (topic prefix iomt/{hospital}/#)")
    parser.add_argument("--broker", default=None, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    parser.add_argument("--data-dir", type=Path, help="where the store lives")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve /healthz and /metrics on this loopback port")
    parser.add_argument("--metrics-host", default=None, help="address for the metrics endpoint")
    parser.add_argument("--batch-max", type=int, default=None, help="commit after this many messages")
    parser.add_argument("--batch-ms", type=float, default=None, help="... or after this many milliseconds")
    parser.add_argument("--username", default=None, help="the edge's MQTT account (iomt broker: edge-HOSPITAL)")
    parser.add_argument("--password", default=None, help="better: --password-file or IOMT_EDGE_PASSWORD")
    parser.add_argument("--password-file", type=Path, default=None, help="file whose first line is the MQTT password")
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA bundle for mqtts://")
    parser.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM) for mqtts://")
    parser.add_argument("--tls-key", type=Path, default=None, help="its private key")
    parser.add_argument("--preprocess-interval", type=float, default=None, dest="preprocess_interval_s",
                        help="seconds between background rebuilds of patient records (0: off)")
    parser.add_argument("--text-embedder", default=None, help="module:function embedding a note's text")
    parser.add_argument("--client-id", default=None, help="MQTT client id (default: random, kept in the data dir)")
    parser.add_argument("--mqtt-version", choices=["5", "3.1.1"], default=None,
                        help="MQTT protocol (default 5: session expiry and receive maximum)")
    parser.add_argument("--influx-url", default=None, help="also write frame points to this InfluxDB 2 URL "
                        "(the --influx-* flags replace the config file's [influx] table)")
    parser.add_argument("--influx-token", default=None, help="better: IOMT_EDGE_INFLUX_TOKEN")
    parser.add_argument("--influx-org", default=None)
    parser.add_argument("--influx-bucket", default=None)


def run(args: argparse.Namespace) -> int:
    try:
        influx = {k: v for k, v in {
            "url": args.influx_url, "token": args.influx_token, "org": args.influx_org,
            "bucket": args.influx_bucket}.items() if v is not None}
        if args.influx_url:
            influx["enabled"] = True
        password = args.password
        if args.password_file is not None:
            try:
                password = (args.password_file.read_text().splitlines() or [""])[0]
            except OSError as err:
                raise ConfigError(f"--password-file: {err}") from err
        settings = load_settings(
            args.config,
            hospital=args.hospital, broker=args.broker, data_dir=args.data_dir, metrics_port=args.metrics_port,
            metrics_host=args.metrics_host, batch_max=args.batch_max, batch_ms=args.batch_ms,
            username=args.username, password=password, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            preprocess_interval_s=args.preprocess_interval_s, text_embedder=args.text_embedder,
            client_id=args.client_id, mqtt_version=args.mqtt_version, influx=influx or None)
        daemon = EdgeDaemon(settings)
    except (ConfigError, ValueError) as err:
        log.error("configuration: %s", err)
        return EXIT_CONFIG
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    log.info("edge %s ingesting from %s into %s", settings.hospital, settings.broker, settings.data_dir)
    return daemon.run()
