"""Pipeline stages: plain callable classes over batches of segments (no Ray imports)."""
