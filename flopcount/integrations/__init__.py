"""Framework integrations: hf.py (Trainer / TRL callback), lightning.py (Lightning callback),
launcher.py (``flopcount run``: metering an unmodified program). Each imports its framework lazily."""
