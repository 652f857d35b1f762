"""Pin BLAS (and torch) to one thread before NumPy loads: 2 threads on a busy 2-core box are slower."""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
