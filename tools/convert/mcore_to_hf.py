#!/usr/bin/env python
"""Export a training checkpoint as a Hugging Face model (same as ``llmjp-convert mcore-to-hf``)."""

import sys

from megatron_llmjp.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(["mcore-to-hf", *sys.argv[1:]]))
