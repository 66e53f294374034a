"""High availability: the leadership lease on Consul, with a fencing epoch per term."""
