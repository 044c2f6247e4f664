"""Layer 7: workloads, measurements and plots over the layers below."""
