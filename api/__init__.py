"""Self-hosted face recognition service: register, identify, compare, emotion and anti-spoofing."""

import os

__version__ = "0.1.0"

# Thread pools are sized before numpy, OpenCV or TensorFlow are imported: on a small shared CPU the
# default pools (one thread per core in each library, all at once) oversubscribe the cores and made
# YuNet and BLAS calls tens of times slower here. Each stays overridable from the environment.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
