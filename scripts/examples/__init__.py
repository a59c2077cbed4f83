"""Examples of moetrain's Python API: ``driver_example.py`` builds a config, runs it on Ray and reads
the results back."""
