"""Trainer tests run real TensorFlow on CPU; keep its C++ logging quiet."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
