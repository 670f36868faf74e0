"""The RabbitMQ worker: topology, scheduling, acks, confirms, retries and shutdown."""
