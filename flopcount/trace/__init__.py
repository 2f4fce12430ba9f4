"""Per-step Parquet traces: schema.py (the versioned schema), writer.py, reader.py, manifest.py."""
