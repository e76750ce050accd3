"""Training data for small DiffusionGemma models: synthetic task families and an independent checker."""
