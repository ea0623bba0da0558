"""Training methods: small modules whose ``training_step(batch, progress)`` returns a :class:`StepOutput`."""
