"""The coordinator service: task and agent state, the store, dispatch, results, liveness."""
