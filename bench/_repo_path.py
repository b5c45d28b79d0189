"""Puts the repository root first on ``sys.path``, for a bench script run as a file.

``python bench/X.py`` puts ``bench/`` itself on the path, not the repository root, so ``bench._common``
(and, where the installed package is another checkout's, this checkout's ``llm2clip_fast``) would not
import. Every bench script starts with the same two lines, importing this module only when run as a file
(``from bench import X`` already has the root on the path)::

    if __package__ in (None, ""):
        import _repo_path  # noqa: F401  (bench/_repo_path.py: the repository root on sys.path)

``scripts/cache_dtype_demo.py`` writes the insert itself: a file run from ``scripts/`` cannot import
anything from ``bench/`` before the root is on its path.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
