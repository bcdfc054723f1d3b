"""What runs on a medical device: MQTT publishing with QoS 1, TLS, reconnects with backoff,
last-will presence, bounded memory and an on-disk buffer for broker outages."""
from device_agent.agent import AgentError, DeviceAgent
from device_agent.settings import AgentSettings

__all__ = ["AgentError", "AgentSettings", "DeviceAgent"]
