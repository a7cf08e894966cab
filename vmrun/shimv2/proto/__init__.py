"""containerd's protocol buffers (scripts/import_containerd_protos.py)."""
