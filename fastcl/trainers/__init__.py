"""Reference trainers (python -m fastcl.trainers METHOD)."""
