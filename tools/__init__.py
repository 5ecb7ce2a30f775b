"""Command-line tools: model building, evaluation and benchmarks. Run them as ``python -m tools.<name>``.

Importing the package imports ``api`` first, which pins the thread pools of OpenMP, BLAS and TensorFlow
before any tool module loads numpy, OpenCV or TensorFlow (see api/__init__.py): every tool gets the pinning
without caring about its own import order.
"""

import api  # noqa: F401
