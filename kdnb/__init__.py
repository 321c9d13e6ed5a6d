__version__ = "0.1.0"

# OpenMP's threads sleep at the end of a parallel region instead of spinning, unless the user chose a wait policy:
# beside another busy process a spinning thread keeps a core from the thread it waits for (the 06_engine page; `python
# bench/bench.py --only threads`). libgomp reads the setting when torch loads it, so it is set here, at kdnb's first
# import; a process that imported torch before kdnb keeps what it had.
import os as _os, sys as _sys
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
