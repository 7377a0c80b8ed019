"""Data: the LLM-jp-4 SentencePiece tokenizer and on-the-fly text / synthetic token streams with a
layout-independent global-batch sampler (small CPU runs and tests)."""
