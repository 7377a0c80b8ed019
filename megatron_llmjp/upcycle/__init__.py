"""Drop-Upcycling: initialise a Mixture-of-Experts training checkpoint from a dense one.

``drop`` holds the tensor functions (slicing the dense FFN into experts, partial
re-initialisation, the fresh router), ``driver`` streams a checkpoint through them layer by
layer; ``llmjp-upcycle`` (``cli/upcycle.py``) is the command line.
"""
