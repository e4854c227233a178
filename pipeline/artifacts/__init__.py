"""Artifacts: distilled sets as .npz and Parquet with lineage and checksums, bounded reading of untrusted files, atomic writes, inspection, and the DVC lock doctor."""
