"""Routing: ticket analysis, learned outcomes, the planner that picks a kind and an instance."""
