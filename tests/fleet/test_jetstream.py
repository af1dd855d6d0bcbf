"""JetStream ingest's pure parts: consumer names, subjects, topics and the setting's check.

The ingest itself runs against a real NATS cluster in
``tests/integration/test_fleet_on_broker_cluster.py``.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.link.ingest import INGEST_CHANNELS, Accepted, Reason, Rejection, parse
from fleet.link.jetstream import consumer_name, consumer_subject, mqtt_topic
from models.topics import Channel, DeviceTopic
from models.wire import encode, utc_now
from tests.fleet.test_link import telemetry


def test_each_channel_has_its_own_consumer_per_group() -> None:
    names = {consumer_name("controllers", channel) for channel in INGEST_CHANNELS}
    assert names == {
        "controllers-ingest-reported",
        "controllers-ingest-telemetry",
        "controllers-ingest-events",
    }
    assert consumer_name(None, Channel.TELEMETRY) == "edgefleet-ingest-telemetry"


@pytest.mark.parametrize("group", ["a.b", "a b", "a*", "x" * 60])
def test_a_group_that_cannot_name_a_consumer_is_a_config_error(group: str) -> None:
    with pytest.raises(ConfigError, match="cannot name a JetStream consumer"):
        consumer_name(group, Channel.TELEMETRY)


def test_the_consumer_filters_one_channel_of_every_device() -> None:
    assert consumer_subject(Channel.EVENTS) == "$MQTT.msgs.edgefleet.v1.devices.*.events"


def test_a_stream_subject_maps_back_to_the_topic_ingest_parses() -> None:
    topic = str(DeviceTopic("dev-aaa", Channel.TELEMETRY))
    subject = "$MQTT.msgs." + topic.replace("/", ".")
    assert mqtt_topic(subject) == topic
    accepted = parse(mqtt_topic(subject), encode(telemetry()), received_at=utc_now())
    assert isinstance(accepted, Accepted)
    assert accepted.device_id == "dev-aaa"


def test_a_subject_outside_the_device_tree_is_rejected_by_ingest() -> None:
    result = parse(mqtt_topic("$MQTT.msgs.other.thing"), b"{}", received_at=utc_now())
    assert isinstance(result, Rejection)
    assert result.reason is not Reason.INTERNAL_ERROR


@pytest.mark.parametrize(
    "url", ["nats://a:4222", "nats://a:4222,nats://b:4222", "tls://a:4222, nats://b"]
)
def test_nats_ingest_url_takes_one_or_more_servers(url: str) -> None:
    assert FleetSettings(nats_ingest_url=url).nats_ingest_url == url


@pytest.mark.parametrize("url", ["mqtt://a:1883", "nats://", "a:4222", "nats://a,http://b"])
def test_nats_ingest_url_refuses_what_is_not_a_nats_server(url: str) -> None:
    with pytest.raises(ValidationError, match="is not a NATS URL"):
        FleetSettings(nats_ingest_url=url)
