""" Do learned clusters beat fixed blocks? A matched, controlled CIFAR-10 study (see run.py)."""
