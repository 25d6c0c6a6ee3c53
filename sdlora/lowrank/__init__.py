"""Low-rank tools on adapters and checkpoints: the SVD maths (svd.py), the file tools resize,
extract and merge (tools.py), and spectra for `sdlora inspect` (inspect.py)."""
