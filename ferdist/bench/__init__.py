"""The measuring code behind ``jobs/benchmark.py``: one module per benchmark (the script is only their CLI)."""
