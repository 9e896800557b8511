"""Only here so packaging ships sitecustomize.py; this folder itself goes on PYTHONPATH."""
