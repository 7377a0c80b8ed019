#!/usr/bin/env python
"""Import a Hugging Face model as a training checkpoint (same as ``llmjp-convert hf-to-mcore``)."""

import sys

from megatron_llmjp.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(["hf-to-mcore", *sys.argv[1:]]))
