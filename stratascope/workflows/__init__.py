"""What captures *then* analyses: the bias probe from a model, the demo."""
