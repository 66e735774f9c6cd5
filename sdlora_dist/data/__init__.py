"""Source layouts -> WebDataset task shards, manifest, and the per-task streaming pipeline."""
