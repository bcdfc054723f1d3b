"""Topic parsing and validation."""
from __future__ import annotations

import pytest

from protocols.errors import ProtocolError, TopicError
from protocols.schema import SIGNAL_STREAMS
from protocols.topics import Topic, subscription


def test_round_trip_every_stream_of_its_class():
    cases = [("wearable", s) for s in SIGNAL_STREAMS] + [
        ("imaging", "study"), ("ehr", "record"), ("notes", "note"),
        ("wearable", "presence"), ("imaging", "registration")]
    for device_class, stream in cases:
        text = f"iomt/hosp-A/{device_class}/dev_1.x/{stream}"
        topic = Topic.parse(text)
        assert (topic.hospital, topic.device_class, topic.device_id, topic.stream) == (
            "hosp-A", device_class, "dev_1.x", stream)
        assert str(topic) == text
        assert Topic.parse(str(topic)) == topic


@pytest.mark.parametrize("text", [
    "iomt/h/wearable/dev/ecg/extra",       # too many levels
    "iomt/h/wearable/dev",                  # too few
    "other/h/wearable/dev/ecg",             # wrong prefix
    "iomt/h/fridge/dev/ecg",                # unknown device class
    "iomt/h/wearable/dev/xray",             # unknown stream
    "iomt/h/wearable/dev/study",            # stream of another class
    "iomt/h/imaging/dev/ecg",
    "iomt/h#/wearable/dev/ecg",             # wildcard / bad character in an id
    "iomt/h/wearable/de+v/ecg",
    "iomt//wearable/dev/ecg",               # empty id
    f"iomt/h/wearable/{'d' * 65}/ecg",      # id too long
])
def test_bad_topics_are_rejected_with_a_reason(text):
    with pytest.raises(TopicError) as info:
        Topic.parse(text)
    assert isinstance(info.value, ProtocolError)
    assert info.value.reason == "bad_topic"


def test_topic_is_frozen_and_hashable():
    topic = Topic("h", "wearable", "d", "ecg")
    with pytest.raises(AttributeError):
        topic.stream = "ppg"  # type: ignore[misc]
    assert len({topic, Topic.parse("iomt/h/wearable/d/ecg")}) == 1
    assert topic.with_stream("presence") == Topic("h", "wearable", "d", "presence")


def test_subscription_matches_hospital_only():
    assert subscription("hosp-1") == "iomt/hosp-1/#"
    with pytest.raises(TopicError):
        subscription("a/#")
