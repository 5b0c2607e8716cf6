"""
txqb's benchmarks: txqb against C libqb and Python alternatives.

Run ``.venv/bin/python -m bench --help``; see docs/performance.rst.
"""
