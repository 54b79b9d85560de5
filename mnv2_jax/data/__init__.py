"""Input pipelines and the model's preprocessing."""
