"""Data sources: each module turns one kind of origin into `pipeline.data.RawSplits`."""
