"""Training wing: corpus preprocessing, training, occluder compositing, expert fitting, evaluation."""
