"""Fine-tuning SD3.5 Medium (``sd35 train``): data sets, aspect-ratio buckets, cached latents and text, the trainer."""
