"""High availability: the leadership lease on Consul and the replicated event log on a stream."""
