"""switchkit.eval: tasks, loaders, scorers, methods, analyses and reports."""
