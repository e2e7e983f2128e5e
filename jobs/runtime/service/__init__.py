"""Launching the real-time service: one uvicorn process or Ray Serve replicas, and the update
schedule the service runs."""
