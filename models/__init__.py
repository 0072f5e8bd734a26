"""StableDub networks and the inpainting models the pipeline can run."""
