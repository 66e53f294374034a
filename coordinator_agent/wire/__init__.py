"""The wire both sides speak: message types, sealing and keys, the AMQP transport, and names."""
