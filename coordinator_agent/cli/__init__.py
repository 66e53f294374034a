"""The `coordinator-agent` command line: commands, progress display, the demo, reaching services."""
