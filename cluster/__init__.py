"""Where the work runs: a local Ray for the demo and tests, or an existing cluster."""
