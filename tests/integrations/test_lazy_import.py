"""Importing fastcl or fastcl.integrations imports no peer library."""
import subprocess
import sys


def test_no_peer_is_imported():
    code = ("import sys, fastcl, fastcl.integrations; "
            "peers = ['sentence_transformers', 'pytorch_metric_learning', 'open_clip', 'lightly', 'transformers']; "
            "print([p for p in peers if p in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
