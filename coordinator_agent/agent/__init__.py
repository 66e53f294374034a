"""The agent side: the WorkerAgent SDK and the example agent that the demo and `worker` run."""
