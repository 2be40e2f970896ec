"""eBPF probes: loading (CO-RE objects through libbpf, bcc as the fallback) and feature checks
(loader.py, libbpf.py), what `hostagent run` attaches before the rest of the agent is imported
(early.py), the map layer both loaders share (maps.py), the zero-copy ring buffer reader
(ringbuf.py), one module per probe, registered in registry.py, and the Source over them all
(source.py).

Importing this package imports nothing: early.py's path (libbpf, corebtf) stays free of numpy and
of the probe modules. Loading a probe with bcc imports bcc.
"""
