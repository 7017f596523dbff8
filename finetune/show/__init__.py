"""The show wing: what a person reads (the start-up report, plots, loggers, the console)."""
