"""Serving engines behind a port: Triton Inference Server (bundled with nvidia-pytriton), Ray Serve, and
Triton model repositories (``export-triton``). All speak the Open Inference Protocol (KServe v2)."""
