"""`python -m bench` when the repository root is importable; from the repository root use `python bench/run.py`
(with PYTHONSAFEPATH=1 the working directory is not on sys.path, and it must not be: operator/ would shadow the
standard library)."""

from bench.run import main

raise SystemExit(main())
