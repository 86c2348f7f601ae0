"""The expert pack (SPEC §3): a GGUF whose routed experts each sit in one 4096-aligned byte range.

stream.py writes GGUF files tensor by tensor; layout.py orders a pack and writes its manifest;
manifest.py reads and verifies one; sources.py plans a pack from a GGUF file or an HF checkpoint.
The entry point is `edgemoe.partition`.
"""
