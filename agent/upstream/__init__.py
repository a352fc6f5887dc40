"""From the store to the platform: MQTT and NGSI-LD senders, wire formats, TLS."""
