"""Process groups, rank discovery, the parallel layout and the CPU compatibility layer."""
