"""High availability: the leadership lease (Consul or broker), the replicated log and snapshots."""
