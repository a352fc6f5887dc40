"""The way a reading travels inside the gateway: polling, processing, the durable store."""
