"""Data: the embedded corpus, the shipped tokenizer, and packing with document boundaries."""
