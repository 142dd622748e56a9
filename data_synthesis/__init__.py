"""switchkit.data_synthesis: traces, divergent step, rollouts, labels, resume and shards."""
